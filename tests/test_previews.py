"""The latent preview projection, fitted to the (random-weight) VAE it is built from."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from engine.previews import LatentPreviewer


def _latents_of(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the pipeline's scaled latents, as the denoiser produces them."""
    with torch.no_grad():
        encoded = vae.encode(images).latent_dist.mean
    return (encoded - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


class LinearVAE(torch.nn.Module):
    """A VAE whose encoder is a known linear map of each patch's mean colour: the projection must invert it.

    (A random-weight VAE cannot be used to check accuracy: its GroupNorms discard the colour of flat regions, so
    its latents hardly depend on colour at all; a trained VAE's do, and this stands in for one.)
    """

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.mix = torch.nn.Conv2d(3, 16, 1)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(3))
        self.config = SimpleNamespace(scaling_factor=1.5, shift_factor=0.1)

    def encode(self, images: torch.Tensor) -> Any:
        mean = self.mix(torch.nn.functional.avg_pool2d(images, self.scale))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def test_previews_recover_the_colours_the_latents_encode() -> None:
    scale = 8
    vae = LinearVAE(scale)
    previewer = LatentPreviewer(vae, scale)
    # Colours the fit never saw: a flat orange, and a left-blue/right-green image.
    side = 8 * scale
    orange = torch.tensor([1.0, 0.3, -0.8]).view(1, 3, 1, 1).expand(1, 3, side, side)
    halves = torch.empty(1, 3, side, side)
    halves[:, :, :, : side // 2] = torch.tensor([-0.9, -0.6, 0.9]).view(1, 3, 1, 1)
    halves[:, :, :, side // 2 :] = torch.tensor([-0.7, 0.8, -0.7]).view(1, 3, 1, 1)
    images = torch.cat([orange, halves])
    previews = previewer(_latents_of(vae, images))
    assert [p.size for p in previews] == [(8, 8), (8, 8)]  # the latents' resolution
    expected = ((torch.nn.functional.avg_pool2d(images, scale) + 1) * 127.5).permute(0, 2, 3, 1)
    got = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32)) for p in previews])
    assert (got - expected).abs().max().item() <= 1.0  # rounding only


def test_previews_of_a_real_pipeline_vae(tiny_pipeline: Any) -> None:
    previewer = LatentPreviewer(tiny_pipeline.vae, tiny_pipeline.vae_scale_factor)
    previews = previewer(torch.randn(3, 16, 8, 4, generator=torch.Generator().manual_seed(1)))
    assert [(p.mode, p.size) for p in previews] == [("RGB", (4, 8))] * 3


def test_fit_happens_once_and_previews_are_deterministic(tiny_pipeline: Any) -> None:
    previewer = LatentPreviewer(tiny_pipeline.vae, tiny_pipeline.vae_scale_factor)
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    first = [p.tobytes() for p in previewer(latents)]
    weights = previewer._weights
    assert [p.tobytes() for p in previewer(latents)] == first
    assert previewer._weights is weights  # not refitted
    again = LatentPreviewer(tiny_pipeline.vae, tiny_pipeline.vae_scale_factor)
    assert [p.tobytes() for p in again(latents)] == first  # the fit itself is seeded
