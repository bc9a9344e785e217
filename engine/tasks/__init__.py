"""One room per task: what text-to-image, image-to-image (and each task to come) do differently (see ``base``).

``get_task(request.task)`` is how both runners find a request's task.
"""

from __future__ import annotations

from .base import AfterStep, Start, Task, set_timesteps
from .image_to_image import ImageToImage
from .pipelines import TaskPipelines
from .text_to_image import TextToImage

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "AfterStep",
    "ImageToImage",
    "Start",
    "Task",
    "TaskPipelines",
    "TextToImage",
    "get_task",
    "set_timesteps",
]

TASKS: dict[str, Task] = {task.name: task for task in (TextToImage(), ImageToImage())}
DEFAULT_TASK = TextToImage.name


def get_task(name: str) -> Task:
    """The task registered as ``name``; ValueError, naming the known ones, for any other."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
