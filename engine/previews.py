"""Preview images of latents mid-generation: a linear latent-to-RGB projection fitted to the model's own VAE.

Why a projection and not the VAE: a preview is wanted every few steps, and decoding through the VAE costs about as
much as the final decode (at 1024x1024 on SD3 it is a large share of one denoising step), for every preview of
every request; the denoising loop would pay it. A projection of the 16 latent channels to RGB is one small matrix
product per latent pixel: the preview has the latents' resolution (1/8 of the image's side) and the right colours
and shapes, which is what a progress preview is for. bench/previews.py measures both; bench/RESULTS.md has the
figures.

The projection is fitted, not hard-coded: at load, the VAE encodes a few synthetic colour images (random smooth
colour fields), and a least-squares fit maps each latent pixel (in the pipeline's scaled latent space, where the
denoiser works) to the mean colour of the image patch it covers. That is the same kind of map people hand-fit for
SD3, made from whatever VAE is loaded, so a random-weight test model gets a consistent one too.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["LatentPreviewer"]

FIT_IMAGES = 8  # synthetic images encoded to fit the projection
FIT_LATENT_SIDE = 16  # their size in latent pixels (16 -> 128x128 images with SD3's 8x VAE)


class LatentPreviewer:
    """``previewer(latents)`` -> one PIL image per latent, at the latents' resolution.

    Args:
        vae: the pipeline's AutoencoderKL (its config's ``scaling_factor`` and ``shift_factor`` define the
            pipeline's latent space).
        scale: the VAE's downsampling factor (``pipeline.vae_scale_factor``).
    """

    def __init__(self, vae: Any, scale: int) -> None:
        self.vae = vae
        self.scale = scale
        self._weights: torch.Tensor | None = None  # (channels + 1, 3): a bias row last
        self._fitting = threading.Lock()
        self.fit_s = 0.0

    def fit(self) -> None:
        """Fit the projection (once; later calls return at once). Safe to call from several threads."""
        with self._fitting:
            if self._weights is not None:
                return
            started = time.perf_counter()
            self._weights = self._fit()
            self.fit_s = time.perf_counter() - started
            logger.info("latent preview projection fitted in %.2fs", self.fit_s)

    def _fit(self) -> torch.Tensor:
        param = next(self.vae.parameters())
        generator = torch.Generator("cpu").manual_seed(0)
        side = FIT_LATENT_SIDE * self.scale
        # Smooth random colour fields: a few colours per image, bilinearly blended, plus flat colours.
        coarse = torch.rand(FIT_IMAGES, 3, 4, 4, generator=generator) * 2 - 1
        images = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)
        images[: FIT_IMAGES // 4] = coarse[: FIT_IMAGES // 4, :, :1, :1].expand(-1, -1, side, side)
        with torch.no_grad():
            encoded = self.vae.encode(images.to(param.device, param.dtype)).latent_dist.mean.float().cpu()
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        latents = (encoded - shift) * config.scaling_factor  # the pipeline's latent space
        targets = F.avg_pool2d(images, self.scale)  # each latent pixel's patch colour, in [-1, 1]
        inputs = _with_bias(latents)
        colours = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        return torch.linalg.lstsq(inputs, colours).solution

    def __call__(self, latents: torch.Tensor) -> list[Any]:
        from PIL import Image

        self.fit()
        assert self._weights is not None
        with torch.no_grad():
            rgb = _with_bias(latents.detach().float().cpu()) @ self._weights
        batch, _, height, width = latents.shape
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(batch, height, width, 3)
        return [Image.fromarray(np.ascontiguousarray(p.numpy())) for p in pixels]


def _with_bias(latents: torch.Tensor) -> torch.Tensor:
    """(batch, channels, h, w) -> (batch * h * w, channels + 1): one row per latent pixel, a constant 1 last."""
    rows = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
