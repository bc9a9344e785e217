"""An A1111 txt2img or img2img body made into this server's ``GenerationRequest``s (``Plan``).

- **Images and seeds**: ``batch_size`` x ``n_iter`` images, image i with seed ``seed + i`` (A1111's ``all_seeds``),
  each its own generation of one image: the native API with that seed gives the same image, and each image's
  infotext reproduces it alone. They are submitted together: the step engine batches them in its denoising loop,
  the threads engine runs them in its slots side by side. ``seed`` -1 draws one.
- **Defaults**: ``steps``, ``cfg_scale``, ``width`` and ``height`` absent take this server's defaults
  (``--default-steps``, the pipeline's guidance, the model's native size), not A1111's 50 steps and 512x512.
- **Sampler**: SD3 samples with the flow-matching Euler scheduler. ``Euler`` (its alias ``k_euler``, and
  ``sampler_index`` when ``sampler_name`` is absent) is what runs; any other name runs the same scheduler, and the
  answer says so: ``info.sampler_name`` is ``Euler`` and the infotext adds ``Requested sampler: <name>``. Likewise
  ``scheduler``: ``Automatic`` (the model's own schedule) runs; another is reported as ``Requested schedule type``.
- **img2img**: ``steps`` and ``denoising_strength`` are the native ``num_inference_steps`` and ``strength``; a ``mask``
  (white repaints) makes it inpainting, ``inpainting_mask_invert`` swaps the colours, ``mask_blur`` (A1111's default
  4; ``mask_blur_x`` / ``_y`` when equal) is the feather at the mask's edge, in pixels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from fastapi import Request

from api.a1111.fields import COMMON, IMG2IMG, TXT2IMG, check_neutral
from api.a1111.options import check_settings, state_of
from api.a1111.prompt_tags import lora_tags
from api.a1111.schemas import CHECKPOINT_FIELD
from api.deps import request_id
from api.edits import IMAGE_TO_IMAGE, edit_generation, target_size
from api.errors import APIError
from api.generation import to_generation
from api.images_in import decode_string, read_inputs
from api.models import model_of, use_model
from api.schemas import LoraChoice

CONCAT_CHANNELS = 33  # an inpainting model's transformer (engine.tasks.inpainting)

__all__ = ["EULER", "Plan", "img2img_plan", "txt2img_plan"]

EULER = "Euler"  # what runs: SD3's flow-matching Euler (FlowMatchEulerDiscreteScheduler)
EULER_NAMES = frozenset({"euler", "k_euler"})
AUTOMATIC = "Automatic"  # the model's own schedule, in A1111's words
NAMES = {"steps": "steps", "n": "batch_size"}  # our names -> A1111's, for to_generation's messages
MAX_SEED = 2**32 - 1


@dataclass
class Plan:
    """What an A1111 request runs and what its answer reports."""

    generations: list[Any]  # one GenerationRequest per image
    task_id: str
    encoding: Any  # utils.image_store.Encoding: samples_format
    model: str
    prompt: str  # as given, tags included (the infotext reproduces the request)
    sampler: str = EULER
    scheduler: str = AUTOMATIC
    notes: dict[str, str] = field(default_factory=dict)  # infotext entries: what was asked for and ran otherwise
    ignored_settings: list[str] = field(default_factory=list)
    conditioning: bool = False  # an inpainting model's mask and masked image go into the transformer


def _seeds(seed: int, count: int) -> list[int]:
    """Image i's seed, ``seed + i``; -1 draws a first seed that leaves room for all of them."""
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED - count + 2)
    elif seed + count - 1 > MAX_SEED:
        raise APIError(
            400,
            f"seed: image i gets seed + i, so seed must be at most {MAX_SEED - count + 1} for {count} image(s)",
            param="seed",
            code="invalid_value",
        )
    return [seed + i for i in range(count)]


def _sampling(body: Any) -> dict[str, str]:
    """The infotext's notes for a sampler or schedule asked for that is not what runs (see the module's notes)."""
    notes = {}
    sampler = (body.sampler_name or body.sampler_index or EULER).strip()
    if sampler.lower() not in EULER_NAMES:
        notes["Requested sampler"] = sampler[:64]
    scheduler = (body.scheduler or AUTOMATIC).strip()
    if scheduler.lower() != AUTOMATIC.lower():
        notes["Requested schedule type"] = scheduler[:64]
    return notes


async def _common(request: Request, body: Any, rules: tuple[Any, ...]) -> tuple[SimpleNamespace, dict[str, Any], Plan]:
    """The checks and settings both routes share: (what ``to_generation`` reads, the effective options, the plan
    without its generations). The request is routed to its checkpoint's model (``api.models.use_model``)."""
    from utils.image_store import Encoding

    check_neutral(body, COMMON + rules)
    count = body.batch_size * body.n_iter
    limit = request.app.state.settings.max_images_per_request
    if count > limit:
        message = f"batch_size x n_iter: {count} images, more than the {limit} this server makes per request"
        raise APIError(400, message, param="batch_size", code="invalid_value")
    options = dict(state_of(request).options)
    applied, ignored = check_settings(body.override_settings or {}, request, "override_settings.")
    options.update(applied)
    await use_model(request, options[CHECKPOINT_FIELD])
    text, chosen = lora_tags(request, body.prompt, body.disable_extra_networks)
    view = SimpleNamespace(
        prompt=text,
        negative_prompt=body.negative_prompt or "",
        num_inference_steps=body.steps,
        seed=_seeds(body.seed, count)[0],
        guidance_scale=body.cfg_scale,
        loras=[LoraChoice(name=name, scale=scale) for name, scale in chosen] or None,
    )
    plan = Plan(
        generations=[],
        task_id=body.force_task_id or request_id(request),
        encoding=Encoding(options["samples_format"]),
        model=options["sd_model_checkpoint"],
        prompt=body.prompt,
        notes=_sampling(body),
        ignored_settings=ignored,
    )
    return view, options, plan


def _previews(options: dict[str, Any]) -> int:
    every = options["show_progress_every_n_steps"]
    return every if options["live_previews_enable"] and every > 0 else 0


def _spread(first: Any, count: int, previews: int) -> list[Any]:
    """``count`` generations like ``first``, image i with seed ``first.seed + i`` (``first`` is image 0)."""
    first.preview_every = previews
    return [first if i == 0 else dataclasses.replace(first, seed=first.seed + i) for i in range(count)]


async def txt2img_plan(request: Request, body: Any) -> Plan:
    """The generations of a txt2img body (see the module's notes)."""
    view, options, plan = await _common(request, body, TXT2IMG)
    first = to_generation(request, view, NAMES, n=1, height=body.height, width=body.width, blank_prompt=True)
    plan.generations = _spread(first, body.batch_size * body.n_iter, _previews(options))
    return plan


def _mask_blur(body: Any) -> int:
    if body.mask_blur is not None:
        return body.mask_blur
    if body.mask_blur_x != body.mask_blur_y:
        message = "mask_blur_x and mask_blur_y differ; this server feathers evenly: send mask_blur"
        raise APIError(400, message, param="mask_blur_x", code="unsupported_value")
    return body.mask_blur_x


async def _inputs(request: Request, body: Any) -> list[Any]:
    """The decoded init images (in order), each with the mask (inverted if asked), checked as the native API's."""
    if not body.init_images:
        raise APIError(400, "init_images: send at least one image (base64 or a data: URL)", param="init_images")
    max_side = request.app.state.settings.max_input_side
    mask = None if body.mask is None else decode_string(body.mask, "mask")
    decoded = []
    for i, image in enumerate(body.init_images):
        names = (f"init_images[{i}]", "mask")
        decoded.append(await read_inputs(decode_string(image, names[0]), mask, "native", max_side, names))
    if mask is not None and body.inpainting_mask_invert:
        from PIL import ImageOps

        for inputs in decoded:
            inputs.mask = await asyncio.to_thread(ImageOps.invert, inputs.mask)
    return decoded


def _notes(body: Any) -> dict[str, str]:
    """What an inpainting request asked for that runs otherwise here (reported in the infotext)."""
    if body.mask is None:
        return {}
    notes = {"Masked content": "original"}  # 0 (fill) runs as 1 (original): see api.a1111.fields
    if body.inpaint_full_res:
        notes["Inpaint area"] = "Whole picture"  # "only masked" is not available: the whole image is inpainted
    return notes


async def img2img_plan(request: Request, body: Any) -> Plan:
    """The generations of an img2img body: image i starts from ``init_images[i % len]`` (see the module's notes)."""
    view, options, plan = await _common(request, body, IMG2IMG)
    blur = _mask_blur(body)
    decoded = await _inputs(request, body)
    width, height = target_size(request, decoded[0].size, body.width, body.height)
    names = {**NAMES, "mask": "mask"}
    firsts = []
    for inputs in decoded:
        try:
            first = await edit_generation(
                request,
                view,
                names,
                inputs,
                n=1,
                width=width,
                height=height,
                strength=body.denoising_strength,
                blank_prompt=True,
            )
        except APIError as exc:
            if exc.param == "strength":  # named as A1111 names it
                exc.param, exc.message = "denoising_strength", "denoising_" + exc.message
            raise
        if first.task != IMAGE_TO_IMAGE:
            first.mask_blur = blur
            plan.conditioning = model_of(request).loaded.pipeline.transformer.config.in_channels == CONCAT_CHANNELS
        firsts.append(first)
    plan.generations = _spread(firsts[0], body.batch_size * body.n_iter, _previews(options))
    for i, generation in enumerate(plan.generations):
        source = firsts[i % len(firsts)]
        generation.image, generation.mask_image = source.image, source.mask_image
    plan.notes.update(_notes(body))
    return plan
