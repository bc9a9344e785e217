"""Edits on the generation side: a request's decoded inputs (``api.images_in``) and fields made into an
image-to-image or an inpainting ``GenerationRequest``, shared by the native API, jobs, OpenAI's edits and variations.

- **The task**: an image alone is image-to-image; an image and a mask, inpainting; none, text-to-image as before.
- **The size**: explicit width and height resize the input; with one of them the other follows the input's aspect
  ratio; with neither it is the input's own size, scaled down to fit the largest side accepted here and rounded to
  the model's size multiple (``fit_size``).
- **Strength**: the task's default when the request names none (image-to-image 0.6, inpainting 1.0, as diffusers'
  pipelines have them), set on the request so that the answer reports the value used. A strength that leaves no
  denoising step of the request's steps is refused 400 (the engine would have nothing to run).
- **The feather** (``mask_blur``, pixels): inpainting only, default 0 (a hard edge, as OpenAI's edits keep the
  unmasked pixels); refused 400 without a mask. The engine puts the input's own pixels back outside the mask after
  decoding (``engine.tasks.inpainting``); the feather blends a band about the mask's edge.
- A task the loaded model cannot run is refused 400 with the reason (``engine.tasks.available_tasks``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from api.errors import APIError
from api.generation import to_generation
from api.images_in import EditInputs, decode_string, read_inputs, resized
from api.limits import max_side
from api.models import model_of, use_model

__all__ = ["edit_generation", "fit_size", "native_generation", "task_status"]

IMAGE_TO_IMAGE, INPAINTING = "image-to-image", "inpainting"


def _nearest(value: float, multiple: int) -> int:
    """The multiple of ``multiple`` nearest ``value``, halves rounded up (not to even, as ``round`` does)."""
    return int(value / multiple + 0.5) * multiple


def fit_size(size: tuple[int, int], largest: int, multiple: int) -> tuple[int, int]:
    """``size`` (width, height) scaled down to fit ``largest`` on both sides (never up), each side rounded to the
    nearest multiple of ``multiple`` within [multiple, largest]."""
    top = max(multiple, largest // multiple * multiple)
    scale = min(1.0, largest / max(size))

    def side(value: int) -> int:
        return min(top, max(multiple, _nearest(value * scale, multiple)))

    return side(size[0]), side(size[1])


def target_size(request: Request, size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The size an edit generates at (see the module's notes); explicit sides are checked by ``to_generation``."""
    settings, geometry = request.app.state.settings, model_of(request).geometry
    largest, multiple = max_side(settings, geometry), geometry.size_multiple
    if width is not None and height is not None:
        return width, height
    if width is None and height is None:
        return fit_size(size, largest, multiple)
    top = max(multiple, largest // multiple * multiple)

    def follow(side: int, ratio: float) -> int:  # the other side, at the input's aspect ratio
        return min(top, max(multiple, _nearest(side * ratio, multiple)))

    if width is not None:
        return width, follow(width, size[1] / size[0])
    assert height is not None
    return follow(height, size[0] / size[1]), height


def _reasons(pipeline: Any) -> dict[str, str | None]:
    """Every task of the engine -> why the loaded ``pipeline`` cannot run it (None: it can)."""
    from engine.tasks import available_tasks

    return available_tasks(pipeline)


def task_status(loaded: Any) -> dict[str, Any] | None:
    """The tasks the loaded model can run, and why it cannot run the others (for /api/status; None before the
    model has loaded)."""
    if loaded is None:
        return None
    reasons = _reasons(loaded.pipeline)
    return {
        "available": [task for task, reason in reasons.items() if reason is None],
        "unavailable": {task: reason for task, reason in reasons.items() if reason is not None},
    }


def _unavailable(request: Request, task: str) -> str | None:
    """Why the loaded model cannot run ``task`` (None: it can)."""
    reasons = _reasons(model_of(request).loaded.pipeline)
    return reasons.get(task, f"this server's engine has no {task} task")


async def edit_generation(
    request: Request,
    body: Any,
    names: dict[str, str],
    inputs: EditInputs,
    *,
    n: int,
    width: int | None,
    height: int | None,
    strength: float | None,
    mask_blur: int | None = None,
    blank_prompt: bool = False,
) -> Any:
    """The generation of an edit of ``inputs`` (see the module's notes); ``body`` and ``names`` as
    ``to_generation`` takes them."""
    from engine.tasks import get_task

    if getattr(request.state, "model_view", None) is None:
        await use_model(request, getattr(body, "model", None))
    if mask_blur is not None and inputs.mask is None:
        mask = names.get("mask", "mask")
        raise APIError(
            400, f"mask_blur: feathers a mask's edge; send {mask} too", param="mask_blur", code="invalid_value"
        )
    w, h = target_size(request, inputs.size, width, height)
    generation = to_generation(request, body, names, n=n, height=h, width=w, blank_prompt=blank_prompt)
    task = IMAGE_TO_IMAGE if inputs.mask is None else INPAINTING
    reason = _unavailable(request, task)
    param = "image" if inputs.mask is None else names.get("mask", "mask")
    if reason is not None:
        raise APIError(400, f"{task} is not available here: {reason}", param=param, code="task_unavailable")
    generation.task = task
    generation.strength = get_task(task).default_strength if strength is None else strength
    if get_task(task).steps(generation) < 1:
        raise APIError(
            400,
            f"strength: {generation.strength:g} of {generation.num_inference_steps} step(s) runs no denoising step; "
            "raise strength or num_inference_steps",
            param="strength",
            code="invalid_value",
        )
    sized = await asyncio.to_thread(resized, inputs, w, h)
    generation.image = sized.image
    if sized.mask is not None:
        generation.mask_image = sized.mask
        generation.mask_blur = mask_blur or 0
    return generation


async def native_generation(request: Request, body: Any, names: dict[str, str], n: int) -> Any:
    """The generation of a native or job body: text-to-image as before, or an edit when it carries ``image``."""
    await use_model(request, body.model)
    if body.image is None:
        for field in ("mask_image", "strength", "mask_blur"):
            if getattr(body, field) is not None:
                raise APIError(
                    400, f"{field}: applies to an edit; send an image too", param=field, code="invalid_value"
                )
        return to_generation(request, body, names, n=n, height=body.height, width=body.width)
    image = decode_string(body.image, "image")
    mask = None if body.mask_image is None else decode_string(body.mask_image, "mask_image")
    settings = request.app.state.settings
    inputs = await read_inputs(image, mask, "native", settings.max_input_side, ("image", "mask_image"))
    return await edit_generation(
        request,
        body,
        {**names, "mask": "mask_image"},
        inputs,
        n=n,
        width=body.width,
        height=body.height,
        strength=body.strength,
        mask_blur=body.mask_blur,
    )
