"""Inpainting: repaint the masked part of an image, keep the rest (``StableDiffusion3InpaintPipeline``).

``request.mask_image`` follows diffusers' convention: a PIL image the size of ``request.image``, white where the
image is repainted, black where it is kept (binarised at one half). ``strength`` is image-to-image's, but its default
here is ``DEFAULT_STRENGTH`` = 1.0, the one the pipeline documents (its signature says 0.6; the runners always pass
the task's strength, so that never applies): the masked region starts from pure noise, so what is painted
there owes nothing to what was there before; a smaller strength starts from the init image noised part of the way
and keeps its colours and layout under the mask too.

Two kinds of transformer can inpaint, as in the pipeline:

- 16 input channels (SD3 and SD3.5 themselves): after every scheduler step the init image's latents, re-noised to
  the next timestep, replace the latents wherever the mask keeps the image (``Start.after_step``);
- 33 input channels (an inpainting model): the mask and the masked image's latents go into the transformer beside
  the latents, every pass (``Start.condition``). Such a model can run no other task.

What the pipeline answers is the VAE's decode of the whole image: the pixels the mask keeps come back through the
VAE too, changed (a little with a real VAE, entirely with a random one). So, after decoding, ``finish_images`` puts
the input's own pixels back wherever the mask keeps the image (as A1111's and InvokeAI's inpainting do, and as
OpenAI's edits promise): the init image at the request's size (resized as the pipeline resizes it), the mask
binarised as the pipeline binarises it. Inside the mask the pixels stay the pipeline's. ``request.mask_blur`` > 0
feathers the seam: the binarised mask, Gaussian-blurred with that radius (PIL's ``GaussianBlur``: its support is
at most 3 x radius pixels each side), is the blend's alpha; the band it spans about the edge mixes the two, and
beyond it each side is exactly the input or exactly the pipeline's image.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image, ImageFilter

from ..types import GenerationRequest
from .base import AfterStep, Start
from .image_to_image import ImageToImage

__all__ = ["DEFAULT_STRENGTH", "Inpainting", "repaint_alpha"]

DEFAULT_STRENGTH = 1.0  # the default diffusers documents for this pipeline (see the module's docstring)
BLEND_CHANNELS = 16  # the pipeline's mask-blend path: SD3's own transformer
CONCAT_CHANNELS = 33  # its concat path: latents (16) + mask (1) + masked image latents (16)


class Inpainting(ImageToImage):
    """Image-to-image (the same schedule cut by ``strength``) within a mask; see the module's docstring."""

    name = "inpainting"
    pipeline_class = "StableDiffusion3InpaintPipeline"
    default_strength: ClassVar[float] = DEFAULT_STRENGTH

    def unavailable(self, pipeline: Any) -> str | None:
        """The pipeline's own condition: 16-channel latents, and a transformer of 16 input channels or 33."""
        latent = pipeline.vae.config.latent_channels
        channels = pipeline.transformer.config.in_channels
        if latent == 16 and channels in (BLEND_CHANNELS, CONCAT_CHANNELS):
            return None
        return (
            f"inpainting needs a transformer of {BLEND_CHANNELS} input channels (SD3's own) or {CONCAT_CHANNELS} (an "
            f"inpainting model) over a 16-channel VAE; this model's transformer takes {channels} over a "
            f"{latent}-channel VAE"
        )

    def pipeline_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        self._check(request)
        return {**super().pipeline_arguments(request), "mask_image": request.mask_image}

    def vae_input(self, view: Any, latents: torch.Tensor) -> torch.Tensor:
        """Only the scaling undone: diffusers' inpainting pipeline decodes ``latents / scaling_factor`` and leaves
        the VAE's shift out (its other SD3 pipelines add it back). Kept, so that both engines give its images."""
        return latents / view.vae.config.scaling_factor

    def start(self, view: Any, request: GenerationRequest, dtype: torch.dtype, device: torch.device) -> Start:
        """As the pipeline prepares it: the schedule cut to ``strength``; then, from one CPU generator in the
        pipeline's order, the init image's latents (a 16-channel transformer, or any strength under 1: their sample
        drawn first), the noise, and (33 channels) the masked image's latents; the mask at the latents' size."""
        self._check(request)
        timesteps = self.schedule(view, request, device)
        strength, n = self.strength(request), request.num_images
        image = view.image_processor.preprocess(request.image, height=request.height, width=request.width)
        image = image.to(dtype=torch.float32)
        mask = view.mask_processor.preprocess(request.mask_image, height=request.height, width=request.width)
        blend = view.transformer.config.in_channels == BLEND_CHANNELS
        generator = torch.Generator("cpu").manual_seed(request.seed)
        with torch.no_grad():
            prepared = view.prepare_latents(
                n, view.vae.config.latent_channels, request.height, request.width, dtype, device, generator,
                image=image, timestep=timesteps[:1].repeat(n), is_strength_max=strength == 1.0,
                return_noise=True, return_image_latents=blend,
            )  # fmt: skip
            if blend:
                latents, noise, image_latents = prepared
                repaint = _latent_mask(view, mask, request, dtype, device)
                return Start(latents, timesteps, _blend(view, timesteps, repaint, image_latents, noise))
            mask, masked = view.prepare_mask_latents(
                mask, image * (mask < 0.5), 1, n, request.height, request.width, dtype, device, generator, False
            )
        return Start(prepared[0], timesteps, condition=torch.cat([mask, masked], dim=1))

    def finish_images(self, request: GenerationRequest, images: list[Any]) -> list[Any]:
        """The decoded images with the input's own pixels wherever the mask keeps the image (see the module's
        docstring); where it repaints, the decoded pixels as they are."""
        self._check(request)
        size = (request.width, request.height)
        init = _at_size(request.image, size).convert("RGB")
        alpha = repaint_alpha(request.mask_image, size, request.mask_blur)
        return [Image.composite(image.convert("RGB"), init, alpha) for image in images]

    def _check(self, request: GenerationRequest) -> None:
        if request.image is None or request.mask_image is None:
            raise ValueError("inpainting needs an image and a mask image")
        if request.mask_blur < 0:
            raise ValueError(f"mask_blur must be 0 or more pixels, not {request.mask_blur}")


def _at_size(image: Any, size: tuple[int, int]) -> Any:
    """``image`` at ``size`` (width, height), resized as diffusers' image processors resize a PIL image (Lanczos)."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def repaint_alpha(mask: Any, size: tuple[int, int], blur: int = 0) -> Any:
    """How much of the repainted image each pixel takes (``L``: 255 all of it, 0 none, the input's): ``mask`` at
    ``size`` binarised at one half as the pipeline's mask processor does (resized, then grey), then blurred by a
    Gaussian of radius ``blur`` pixels (0: none, a hard edge)."""
    grey = _at_size(mask, size).convert("L")
    alpha = grey.point(lambda level: 255 if level >= 128 else 0)  # level / 255 >= 0.5, the pipeline's binarize
    return alpha.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else alpha


def _latent_mask(
    view: Any, mask: torch.Tensor, request: GenerationRequest, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The mask at the latents' size, one row per image, as ``prepare_mask_latents`` makes it (here without the
    masked image's VAE encode: the blend path never reads it, and it draws from the generator after everything
    else)."""
    scale = view.vae_scale_factor
    mask = torch.nn.functional.interpolate(mask, size=(request.height // scale, request.width // scale))
    mask = mask.to(device=device, dtype=dtype)
    return mask.repeat(request.num_images // mask.shape[0], 1, 1, 1)


def _blend(
    view: Any, timesteps: torch.Tensor, mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor
) -> AfterStep:
    """The pipeline's step after each scheduler step: where the mask keeps the image, the init image's latents
    noised to the next timestep (the last step: the init latents themselves) replace the denoised ones."""

    def after_step(step: int, latents: torch.Tensor) -> torch.Tensor:
        kept = image_latents
        if step < len(timesteps) - 1:
            # The view's scheduler has just stepped: its step index is the next timestep's, which scale_noise uses.
            kept = view.scheduler.scale_noise(image_latents, timesteps[step + 1].reshape(1), noise)
        return (1 - mask) * kept + mask * latents

    return after_step
