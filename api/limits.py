"""What the bounded request fields accept, worded once with the configured limits.

A value can fail two checks: the schema's hard bounds (pydantic, before the handler) and the configured, tighter
limits (``api.generation.to_generation``). Both answer with these words, so a client always reads the limit that
applies here ("between 1 and 10", never the schema's "<= 64").
"""

from __future__ import annotations

from typing import Any

from api.schemas import MAX_MASK_BLUR, OPENAI_MAX_N, OPENAI_MAX_PARTIAL_IMAGES

__all__ = ["form_limits", "limit_messages", "max_side"]


def max_side(settings: Any, geometry: Any | None) -> int:
    """The largest width or height: the configured one, or the model's own if smaller (known once loaded)."""
    model_max = getattr(geometry, "max_size", None)
    return min(settings.max_image_size, model_max or settings.max_image_size)


def limit_messages(settings: Any, geometry: Any | None) -> dict[str, str]:
    """Field name (as each API calls it) -> what it accepts, with the configured limits."""
    side = f"must be between 16 and {max_side(settings, geometry)} pixels"
    prompt = f"at most {settings.max_prompt_chars} characters"
    return {
        "prompt": f"{prompt}; shorten the prompt",
        "negative_prompt": prompt,
        "num_inference_steps": f"must be between 1 and {settings.max_steps}",
        "steps": f"must be between 1 and {settings.max_steps}",  # the A1111 API's name
        "batch_size": f"batch_size x n_iter must be between 1 and {settings.max_images_per_request}",
        "n_iter": f"batch_size x n_iter must be between 1 and {settings.max_images_per_request}",
        "num_images_per_prompt": f"must be between 1 and {settings.max_images_per_request}",
        "n": f"must be between 1 and {min(OPENAI_MAX_N, settings.max_images_per_request)}",
        "height": side,
        "width": side,
        "partial_images": f"must be between 0 and {OPENAI_MAX_PARTIAL_IMAGES}",
        "mask_blur": f"must be between 0 and {MAX_MASK_BLUR} pixels (0: a hard edge)",
    }


def form_limits(settings: Any, geometry: Any | None) -> dict[str, Any]:
    """What a request may ask for here, and what it gets when it names nothing (in /api/status, and public at
    /ui/limits for the playground's form). The model's sizes are known once it has loaded (null before)."""
    return {
        "default_size": geometry.default_size if geometry is not None else None,
        "size_multiple": geometry.size_multiple if geometry is not None else None,
        "max_size": max_side(settings, geometry),
        "default_steps": settings.default_steps,
        "max_steps": settings.max_steps,
        "max_images_per_request": settings.max_images_per_request,
        "max_prompt_chars": settings.max_prompt_chars,
    }
