"""A1111's fields that this server cannot apply: accepted at their neutral value, a 400 naming them otherwise.

Clients send A1111's whole body with its defaults (the hires fix off, no face restoration, no scripts), so each such
field is accepted at the value that asks for nothing; any other value is refused, never silently ignored, with a
400 that names every such field and says why (``check_neutral``). The fields that change nothing here whatever
their value (``save_images``, ``do_not_save_*``, ``eta`` for a non-ancestral sampler, the hires fix's own fields
while it is off, ...) are accepted and ignored; docs/api/a1111.md has the table, field by field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.errors import APIError

__all__ = ["check_neutral"]

Rule = tuple[str, Callable[[Any], bool], str]


def _off(value: Any) -> bool:
    return not value


COMMON: tuple[Rule, ...] = (
    ("styles", _off, "this server keeps no prompt styles (GET /sdapi/v1/prompt-styles): put their text in the prompt"),
    ("subseed_strength", _off, "variation seeds are not available here: send 0"),
    ("seed_resize_from_h", lambda v: v in (-1, 0), "seed resizing is not available here: send -1"),
    ("seed_resize_from_w", lambda v: v in (-1, 0), "seed resizing is not available here: send -1"),
    ("restore_faces", _off, "face restoration is not available here: send false"),
    ("tiling", _off, "tiling is not available here: send false"),
    ("s_churn", _off, "churn adds noise to Euler's steps, not available here: send 0"),
    ("s_min_uncond", _off, "skipping the negative prompt's pass is not available here: send 0"),
    ("refiner_checkpoint", _off, "a refiner is not available here: send null"),
    ("script_name", _off, "scripts are not available here (GET /sdapi/v1/scripts has none): send null"),
    ("alwayson_scripts", _off, "scripts (ControlNet, ADetailer, ...) are not available here: send {}"),
    ("infotext", _off, "parameters are not read from an infotext here: send them as fields"),
)
TXT2IMG: tuple[Rule, ...] = (
    (
        "enable_hr",
        _off,
        "the hires fix is not available here: generate at the size you want, or upscale the image with img2img",
    ),
)
IMG2IMG: tuple[Rule, ...] = (
    ("resize_mode", lambda v: v == 0, "only 0 (just resize) is available here"),
    (
        "inpainting_fill",
        lambda v: v in (0, 1),
        "only 0 (fill) and 1 (original) are available here, both run from the original image",
    ),
    ("initial_noise_multiplier", lambda v: v is None or v == 1, "send null or 1"),
    ("latent_mask", lambda v: v is None, "a separate latent mask is not available here: send null"),
)


def check_neutral(body: Any, rules: tuple[Rule, ...]) -> None:
    """400 naming every field of ``body`` that asks for what ``rules`` say this server cannot do."""
    wrong = [(name, why) for name, neutral, why in rules if not neutral(getattr(body, name))]
    if wrong:
        names = ", ".join(name for name, _ in wrong)
        reasons = "; ".join(f"{name}: {why}" for name, why in wrong)
        raise APIError(400, f"not available here: {names} ({reasons})", param=wrong[0][0], code="unsupported_value")
