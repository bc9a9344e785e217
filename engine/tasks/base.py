"""What a task is: the part of a generation that differs between text-to-image and the tasks beside it.

Both runners ask the request's task, and only it, what is particular to that task:

- the threads runner: which diffusers pipeline to call (``pipeline_class``) and the task's own arguments to that
  call (``pipeline_arguments``: the size for text-to-image; the init image and the strength for image-to-image);
- the step runner: where the request's denoising starts (``start``: its starting latents and its timesteps) and
  what follows each scheduler step (``Start.after_step``: nothing for text-to-image or image-to-image; for
  inpainting, the init image re-noised to the next timestep where the mask keeps it), what goes into the transformer
  beside the latents (``Start.condition``: an inpainting model's mask and masked image), and how its final latents
  go into the VAE (``vae_input``);
- both: whether the loaded pipeline can run the task at all (``unavailable``: a reason, or None), asked before any
  work, and answered for every task at once by ``engine.tasks.available_tasks`` (for ``/api/status``); and what the
  decoded images become before they are handed out (``finish_images``: nothing for text-to-image or image-to-image;
  for inpainting, the input's own pixels put back outside the mask). Every final image of either runner, whichever
  API or job asked for it, passes there; previews do not.

Everything else is shared by every task and stays in the runners: the prompt embeddings and their cache, guidance,
the transformer passes and the scheduler steps, cancellation and progress, the VAE decode. Adding a task is adding
a module beside ``text_to_image`` and registering it in ``engine.tasks``; its pipeline class is built over the loaded
pipeline's weights by ``engine.tasks.pipelines.TaskPipelines``, and both runners make the request's view of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..types import GenerationRequest

__all__ = ["AfterStep", "Start", "Task", "refuse_unavailable", "set_timesteps"]

# after_step(step_index, latents) -> latents: runs after the scheduler's step, before the request's step callback.
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Start:
    """Where one request's denoising begins in the step engine."""

    latents: torch.Tensor  # the starting latents, batch = the request's images, in the pipeline's latent space
    timesteps: torch.Tensor  # the timesteps to step through, in order (the view's scheduler is set to them)
    after_step: AfterStep | None = None
    # Concatenated to the latents (channels) in every transformer pass, as an inpainting model's pipeline does: one
    # row per image; the runner repeats it for the guidance halves as it repeats the latents.
    condition: torch.Tensor | None = None


class Task(ABC):
    """One kind of generation. Stateless: one instance serves every request of its kind, from any thread."""

    name: ClassVar[str]  # what GenerationRequest.task names
    pipeline_class: ClassVar[str]  # the diffusers pipeline class the threads runner calls, by name

    def unavailable(self, pipeline: Any) -> str | None:
        """None when ``pipeline`` (the loaded one) can run this task; otherwise why not, in one sentence.

        By default a task denoises latents of the VAE's own channels with a transformer that takes them as they are
        (text-to-image and image-to-image: the pipelines make latents of the transformer's input channels and decode
        them with the VAE)."""
        latent = pipeline.vae.config.latent_channels
        channels = pipeline.transformer.config.in_channels
        if channels != latent:
            return (
                f"{self.name} needs a transformer that takes the VAE's {latent}-channel latents as they are; "
                f"this model's transformer takes {channels} input channels"
            )
        return None

    def vae_input(self, view: Any, latents: torch.Tensor) -> torch.Tensor:
        """What the final latents become before the VAE decodes them, as the task's pipeline does it (SD3's: undo
        the scaling and the shift its encoder applied)."""
        return latents / view.vae.config.scaling_factor + view.vae.config.shift_factor

    def finish_images(self, request: GenerationRequest, images: list[Any]) -> list[Any]:
        """The request's final images (PIL, decoded by the task's pipeline or the step runner's decode) as the
        runners hand them out: by default as they were decoded."""
        return images

    @abstractmethod
    def pipeline_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """The task's own arguments to a call of ``pipeline_class`` (the runner adds the shared ones)."""

    def steps(self, request: GenerationRequest) -> int:
        """The denoising steps the request runs (what its progress counts to): all of them, unless the task cuts the
        schedule."""
        return request.num_inference_steps

    @abstractmethod
    def start(self, view: Any, request: GenerationRequest, dtype: torch.dtype, device: torch.device) -> Start:
        """Prepare ``request`` on its ``view`` (own scheduler) exactly as ``pipeline_class`` would: the starting
        latents (from a CPU generator seeded with ``request.seed``) and the timesteps."""


def set_timesteps(
    view: Any, num_inference_steps: int, latent_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Set the view's scheduler to ``num_inference_steps`` as SD3's pipelines do (with the resolution-dependent shift
    ``mu`` when the scheduler shifts dynamically, as SD3.5's does, from ``latent_size``: the latents' height and
    width) and return its timesteps."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    scheduler = view.scheduler
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        patch = view.transformer.config.patch_size
        seq_len = (latent_size[0] // patch) * (latent_size[1] // patch)
        config = scheduler.config
        kwargs["mu"] = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps


def refuse_unavailable(task: Task, pipeline: Any) -> None:
    """Raise ValueError with the reason when ``pipeline`` cannot run ``task``: what both runners do before any work
    (the API answers it as a bad request)."""
    reason = task.unavailable(pipeline)
    if reason is not None:
        raise ValueError(reason)
