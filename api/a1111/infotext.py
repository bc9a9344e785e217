"""The ``info`` of a txt2img or img2img answer (A1111's ``Processed.js()``, as a JSON string) and its ``infotexts``.

An infotext is A1111's parameters block, one per image, the one its UI pastes back and LibreChat stores: the prompt,
a ``Negative prompt:`` line when there is one, then one line of ``Key: value`` pairs, ``Steps``, ``Sampler``,
``Schedule type``, ``CFG scale``, ``Seed``, ``Size``, ``Model`` first, then what applies (``Denoising strength``,
``Mask blur``, what was asked for and ran otherwise), ``Version`` last. A value holding a comma, a colon or a line
break is quoted as JSON, as A1111 quotes it. The ``Seed`` is the image's own: with the other values it gives the
same image again, alone, on either API.
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["VERSION", "info_of", "infotext"]

VERSION = "sd3-async-server"


def _quote(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _pairs(plan: Any, generation: Any) -> dict[str, Any]:
    pairs: dict[str, Any] = {
        "Steps": generation.num_inference_steps,
        "Sampler": plan.sampler,
        "Schedule type": plan.scheduler,
        "CFG scale": float(generation.guidance_scale),
        "Seed": generation.seed,
        "Size": f"{generation.width}x{generation.height}",
        "Model": plan.model,
    }
    if generation.task != "text-to-image":
        pairs["Denoising strength"] = float(generation.strength)
    if generation.task == "inpainting":
        pairs["Mask blur"] = generation.mask_blur
    return {**pairs, **plan.notes, "Version": VERSION}


def infotext(plan: Any, generation: Any) -> str:
    """One image's parameters block (see the module's notes)."""
    negative = f"\nNegative prompt: {generation.negative_prompt}" if generation.negative_prompt else ""
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in _pairs(plan, generation).items())
    return f"{plan.prompt}{negative}\n{line}"


def info_of(plan: Any, body: Any, kept: list[int], stopped: bool) -> dict[str, Any]:
    """The ``info`` object: A1111's keys for the images answered (``kept``: their indices in the plan), and this
    server's own (``request_id``, ``task``, ``interrupted``, ``ignored_settings``, ``loras``)."""
    first = plan.generations[0]
    images = [plan.generations[i] for i in kept]
    count = len(images)
    return {
        "prompt": plan.prompt,
        "all_prompts": [plan.prompt] * count,
        "negative_prompt": first.negative_prompt or "",
        "all_negative_prompts": [first.negative_prompt or ""] * count,
        "seed": first.seed,
        "all_seeds": [g.seed for g in images],
        "subseed": body.subseed,
        "all_subseeds": [body.subseed] * count,
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": plan.sampler,
        "scheduler": plan.scheduler,
        "cfg_scale": float(first.guidance_scale),
        "steps": first.num_inference_steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": plan.model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.strength if first.task != "text-to-image" else None,
        "extra_generation_params": dict(plan.notes),
        "index_of_first_image": 0,
        "infotexts": [infotext(plan, g) for g in images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": plan.conditioning,
        "version": VERSION,
        "request_id": first.request_id,
        "task": first.task,
        "interrupted": stopped,
        "ignored_settings": plan.ignored_settings,
        "loras": [{"name": name, "scale": scale} for name, scale in first.loras],
    }
