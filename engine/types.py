"""What goes into the engine and comes out of it: the request, its result, its progress events, the failures, and
the shapes of the callables the engine is built from (runner, step callback, previewer, listener).

The package (``engine``) re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ClientGone",
    "EngineError",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "GenerationTimeout",
    "Listener",
    "MemoryWait",
    "ModelUnavailable",
    "NotReady",
    "OutOfMemory",
    "Overloaded",
    "Previewer",
    "Progress",
    "ProgressEvent",
    "Runner",
    "StepCallback",
    "Tiling",
    "TooLarge",
    "TooLargeForMemory",
    "no_tiling",
]


class EngineError(Exception):
    """Base of the engine's expected failures; the HTTP layer maps each to a status code."""


class Overloaded(EngineError):
    """All slots busy and the queue full: nothing was done."""


class NotReady(EngineError):
    """The engine is loading or draining."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLarge(EngineError):
    """One request asks for more pixels (width x height x images) than the engine ever runs at once."""

    def __init__(self, pixels: int, budget: int) -> None:
        super().__init__(f"{pixels} pixels, more than the budget of {budget}")
        self.pixels = pixels
        self.budget = budget


class TooLargeForMemory(TooLarge):
    """One request's measured memory cost is more than the budget of the requests running at once; ``message`` says
    what would fit."""

    def __init__(self, message: str, cost: int, budget: int) -> None:
        EngineError.__init__(self, message)
        self.message, self.pixels, self.budget = message, cost, budget


class MemoryWait(Overloaded):
    """The memory a request needs will not be free for longer than the server lets it wait; retry after
    ``retry_after`` seconds."""

    def __init__(self, wait: float, retry_after: int) -> None:
        super().__init__(f"memory for this request frees in about {wait:.0f}s")
        self.wait, self.retry_after = wait, retry_after


class ModelUnavailable(EngineError):
    """The request's model cannot be made resident: ``reason`` "too_large" (it cannot fit the memory budget even
    alone) or "load_failed" (its load failed; the cause is in the server's log)."""

    def __init__(self, model: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.model, self.reason, self.message = model, reason, message


class GenerationTimeout(EngineError):
    """The request's deadline passed; its generation was stopped."""


class ClientGone(EngineError):
    """The client disconnected; its generation was stopped or never started."""


class OutOfMemory(EngineError):
    """The device (or host) ran out of memory; caches were freed."""


class GenerationCancelled(Exception):
    """Raised inside the worker thread, from the step callback, to stop a generation."""


@dataclass
class GenerationRequest:
    """One generation, whichever API it came from."""

    prompt: str
    num_inference_steps: int
    num_images: int
    seed: int
    height: int
    width: int
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    request_id: str = ""
    preview_every: int = 0  # preview images every N steps (0: none); needs an engine with a previewer
    task: str = "text-to-image"  # which room of engine.tasks prepares and steps it (engine.tasks.TASKS)
    image: Any = None  # image-to-image, inpainting: the init image (PIL), resized to height x width
    # inpainting: PIL, the size of image; white = repaint, black = keep (diffusers' convention)
    mask_image: Any = None
    # image-to-image, inpainting: how much of the schedule runs, (0, 1] (None: the task's default, 0.6 and 1.0)
    strength: float | None = None
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale), in order (engine.adapters)
    # inpainting: the feather at the mask's edge, pixels (A1111's mask_blur: the Gaussian blur's radius); 0 = a hard
    # edge. The final images are the input outside the mask, blended across a band about the edge (engine.tasks).
    mask_blur: int = 0
    # The model that runs it: a name the engine's model source knows ("": the engine's only model).
    model: str = ""

    def summary(self) -> str:
        """One line for the log: size, steps, images, seed and the prompt (truncated)."""
        return (
            f"{self.width}x{self.height}, {self.num_inference_steps} step(s), {self.num_images} image(s), "
            f"seed {self.seed}, prompt {self.prompt!r:.60}"
        )

    @property
    def pixels(self) -> int:
        """What the request costs the engine while it runs: width x height x images (its activations, its latents
        and its decode all grow with it)."""
        return self.width * self.height * self.num_images


@dataclass
class ProgressEvent:
    """What happened to one request; see the module docstring. ``previews`` holds PIL images (one per image)."""

    type: str  # "loading" (its model is being loaded), "queued", "started" or "step"
    position: int | None = None  # queued: 1 = next to start
    step: int | None = None  # step: steps done so far (1..total)
    total: int | None = None
    elapsed_s: float | None = None  # step: seconds since the request started (left the queue)
    previews: list[Any] | None = None
    model: str | None = None  # loading: the model

    def to_dict(self) -> dict[str, Any]:
        """The event's JSON-ready fields (previews left out), for event streams."""
        fields = {"type": self.type, "model": self.model, "position": self.position, "step": self.step}
        fields["total"] = self.total
        fields["elapsed_s"] = None if self.elapsed_s is None else round(self.elapsed_s, 3)
        return {k: v for k, v in fields.items() if v is not None}


@dataclass
class GenerationResult:
    images: list[Any]
    seed: int
    queued_s: float = 0.0  # waiting for a slot
    first_step_s: float | None = None  # arrival -> first denoising step done
    generate_s: float = 0.0  # in the pipeline


Progress = Callable[[ProgressEvent], None]

# on_step(step_index, latents): latents (the batch being denoised, pipeline space) may be None where unavailable.
StepCallback = Callable[..., None]
Runner = Callable[[GenerationRequest, StepCallback], list[Any]]
Previewer = Callable[[Any], list[Any]]
Listener = Callable[[GenerationRequest, "GenerationResult | BaseException"], None]
# tiles(width, height): whether an image of that size is decoded in tiles (--vae-tiling).
Tiling = Callable[[int, int], bool]


def no_tiling(width: int, height: int) -> bool:
    """The default ``Tiling``: never."""
    return False
