"""One room per task: what text-to-image, image-to-image, inpainting (and each task to come) do differently (see
``base``).

``get_task(request.task)`` is how both runners find a request's task; ``available_tasks(pipeline)`` says which of
them the loaded pipeline can run, and why not the others.
"""

from __future__ import annotations

from typing import Any

from .base import AfterStep, Start, Task, refuse_unavailable, set_timesteps
from .image_to_image import ImageToImage
from .inpainting import Inpainting
from .pipelines import TaskPipelines
from .text_to_image import TextToImage

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "AfterStep",
    "ImageToImage",
    "Inpainting",
    "Start",
    "Task",
    "TaskPipelines",
    "TextToImage",
    "available_tasks",
    "get_task",
    "refuse_unavailable",
    "set_timesteps",
]

TASKS: dict[str, Task] = {task.name: task for task in (TextToImage(), ImageToImage(), Inpainting())}
DEFAULT_TASK = TextToImage.name


def get_task(name: str) -> Task:
    """The task registered as ``name``; ValueError, naming the known ones, for any other."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def available_tasks(pipeline: Any) -> dict[str, str | None]:
    """Every registered task: None where ``pipeline`` (the loaded one) can run it, else the one-sentence reason."""
    return {name: task.unavailable(pipeline) for name, task in TASKS.items()}
