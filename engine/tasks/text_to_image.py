"""Text-to-image: pure noise to an image, guided by the prompt (``StableDiffusion3Pipeline``)."""

from __future__ import annotations

from typing import Any

import torch

from ..types import GenerationRequest
from .base import Start, Task, set_timesteps

__all__ = ["TextToImage"]


class TextToImage(Task):
    """Starts from seeded noise of the requested size and steps through every timestep; nothing after each step."""

    name = "text-to-image"
    pipeline_class = "StableDiffusion3Pipeline"

    def pipeline_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        return {"height": request.height, "width": request.width}

    def start(self, view: Any, request: GenerationRequest, dtype: torch.dtype, device: torch.device) -> Start:
        with torch.no_grad():
            latents = view.prepare_latents(
                request.num_images,
                view.transformer.config.in_channels,
                request.height,
                request.width,
                dtype,
                device,
                torch.Generator("cpu").manual_seed(request.seed),
            )
        return Start(latents, set_timesteps(view, request.num_inference_steps, tuple(latents.shape[-2:]), device))
