"""Image-to-image: an init image, noised to ``strength`` and denoised from there (``StableDiffusion3Img2ImgPipeline``).

``strength`` in (0, 1]: how much of the schedule runs, from the timestep ``strength`` of the way down. 1 starts from
(almost) pure noise, as text-to-image does; a small strength keeps the init image's layout and colours. The request's
``height`` and ``width`` are the size the image is resized to (the API sets them, by default the image's own).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..types import GenerationRequest
from .base import Start, Task, set_timesteps

__all__ = ["DEFAULT_STRENGTH", "ImageToImage"]

DEFAULT_STRENGTH = 0.6  # the pipeline's own default


class ImageToImage(Task):
    """Starts from the VAE latents of ``request.image``, noised to the first timestep ``strength`` leaves."""

    name = "image-to-image"
    pipeline_class = "StableDiffusion3Img2ImgPipeline"
    default_strength: ClassVar[float] = DEFAULT_STRENGTH  # what a request naming no strength gets

    def strength(self, request: GenerationRequest) -> float:
        return self.default_strength if request.strength is None else float(request.strength)

    def pipeline_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        return {
            "image": request.image,
            "strength": self.strength(request),
            "height": request.height,
            "width": request.width,
        }

    def steps(self, request: GenerationRequest) -> int:
        """The part of the schedule that runs, counted as the pipeline counts it (``get_timesteps``)."""
        total = request.num_inference_steps
        return total - int(max(total - min(total * self.strength(request), total), 0))

    def start(self, view: Any, request: GenerationRequest, dtype: torch.dtype, device: torch.device) -> Start:
        """As the pipeline does it: the schedule, cut to ``strength`` (on the view's own scheduler: the cut sets its
        begin index), then the init image encoded (its latent sample drawn first) and noised with the same generator."""
        if request.image is None:
            raise ValueError(f"{self.name} needs an init image")
        image = view.image_processor.preprocess(request.image, height=request.height, width=request.width)
        timesteps = self.schedule(view, request, device)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        with torch.no_grad():
            latents = view.prepare_latents(
                image, timesteps[:1].repeat(request.num_images), 1, request.num_images, dtype, device, generator
            )
        return Start(latents, timesteps)

    def schedule(self, view: Any, request: GenerationRequest, device: torch.device) -> torch.Tensor:
        """The view's scheduler set as the pipeline sets it, then cut to ``strength`` (``get_timesteps``, which sets
        its begin index): the timesteps that run. ValueError when the strength leaves none."""
        scale = view.vae_scale_factor
        set_timesteps(view, request.num_inference_steps, (request.height // scale, request.width // scale), device)
        timesteps, steps = view.get_timesteps(request.num_inference_steps, self.strength(request), device)
        if steps < 1:
            raise ValueError(f"strength {self.strength(request)} leaves no step of {request.num_inference_steps}")
        return timesteps
