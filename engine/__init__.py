"""The engine: admission and execution of generations on one shared pipeline. It knows no HTTP.

Rooms (arrows run downward only: the engine imports ``utils`` and diffusers, never ``api``):

- ``admission``: ``Engine``, slots, the bounded queue, deadlines, cancellation, drain, listeners;
- ``progress``: one admitted request's bookkeeping, its step callback and its progress events;
- ``threads`` and ``step``: the two runners behind the one seam ``Engine`` calls (``loop``: the step runner's
  shared denoising loop);
- ``tasks``: one room per task (text-to-image), what each runner asks of a task;
- ``prompt_cache``, ``previews``, ``memory``: what the runners share;
- ``memory_meter``, ``memory_admission``: memory measured on the device, and admission by it;
- ``types``: what goes in and comes out (re-exported here).
"""

from .admission import Engine
from .memory import is_oom, release_memory
from .types import (
    ClientGone,
    EngineError,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    GenerationTimeout,
    Listener,
    MemoryWait,
    ModelUnavailable,
    NotReady,
    OutOfMemory,
    Overloaded,
    Previewer,
    Progress,
    ProgressEvent,
    Runner,
    StepCallback,
    TooLarge,
    TooLargeForMemory,
)

__all__ = [
    "ClientGone",
    "Engine",
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
    "TooLarge",
    "TooLargeForMemory",
    "is_oom",
    "release_memory",
]
