"""A1111's options (``GET``/``POST /sdapi/v1/options``, a request's ``override_settings``) and its checkpoint list.

A1111 keeps hundreds of options; the ones here are those its clients read or set, each either applied or accepted
only at its neutral value (``check_settings``):

- ``sd_model_checkpoint`` (applied): the model that answers, by its title in ``GET /sdapi/v1/sd-models``, its name,
  its name without a ``[hash]`` suffix or a file extension, or ``""`` (no change: Open WebUI sends that). It starts
  as the server's default model; ``POST /sdapi/v1/options`` makes another configured model the one this API's
  requests run on (as A1111 switches its checkpoint), a request's ``override_settings`` for itself alone; the model
  loads on the first request that needs it, as any model here. The other APIs keep the server's default;
- ``samples_format`` (applied): png (default), jpg / jpeg or webp, the encoding of the answered images;
- ``show_progress_every_n_steps`` (applied, default 10) and ``live_previews_enable`` (applied, default true): how
  often a running request's preview (``current_image`` of ``GET /sdapi/v1/progress``) is made; 0 or -1: never;
- ``sd_vae`` (``Automatic`` / ``None``: the model's own VAE), ``CLIP_stop_at_last_layers`` (1) and
  ``eta_noise_seed_delta`` (0): accepted at those values, anything else is a 400 naming the option;
- ``sd_checkpoint_hash``: read-only (null: this server hashes no checkpoint file).

Any other key is ignored, as A1111 ignores the keys it does not have: ``POST /sdapi/v1/options`` accepts what
``GET`` answered (Open WebUI posts that back with the checkpoint changed), and a request's ``override_settings`` lists
the keys it ignored in its ``info`` (``ignored_settings``). The options live in this process (``app.state``): they
start at their defaults and are not shared between replicas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from api.a1111.progress import ProgressBoard
from api.a1111.schemas import CHECKPOINT_FIELD
from api.errors import APIError

__all__ = ["A1111State", "check_settings", "model_entries", "resolve_checkpoint", "state_of"]

FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
# Options accepted only at their neutral value: what A1111 does by default, which is what this server does.
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "sd_vae": (("Automatic", "None", None, ""), "this server decodes with the model's own VAE: send 'Automatic'"),
    "CLIP_stop_at_last_layers": ((1,), "clip skip is not available here: send 1"),
    "eta_noise_seed_delta": ((0,), "the noise seed delta is not available here: send 0"),
}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9A-Fa-f]{6,64}\]$")
_EXTENSION = re.compile(r"\.(safetensors|ckpt|pt|bin|gguf)$", re.IGNORECASE)


def _defaults(model: str) -> dict[str, Any]:
    return {
        CHECKPOINT_FIELD: model,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "show_progress_every_n_steps": 10,
        "live_previews_enable": True,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
    }


@dataclass
class A1111State:
    """This app's A1111 options and the requests in flight on its routes (``api.a1111.progress``)."""

    options: dict[str, Any]
    board: ProgressBoard = field(default_factory=ProgressBoard)


def state_of(request: Request) -> A1111State:
    """The app's A1111 state, made on first use (the routes close over nothing: it lives on ``app.state``)."""
    state = request.app.state
    current = getattr(state, "a1111", None)
    if current is None:
        current = state.a1111 = A1111State(_defaults(state.models.default))
    return current


def model_entries(request: Request) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-models``: every model this server serves, loaded or not (the default first), named as
    clients see them (never a file path)."""
    models = request.app.state.models
    names = [models.default, *(name for name in models.names if name != models.default)]
    return [
        {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
        for name in names
    ]


def _aliases(name: str) -> set[str]:
    """The names a checkpoint answers to, as A1111's aliases: its title, its last path part, without an extension."""
    base = name.rsplit("/", 1)[-1]
    return {name, base, _EXTENSION.sub("", base), _EXTENSION.sub("", name)}


def resolve_checkpoint(value: Any, request: Request, param: str) -> str | None:
    """The served model a checkpoint value names; None for ``""`` or null (no change); 400 naming it otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    titles = [entry["title"] for entry in model_entries(request)]
    if isinstance(value, str):
        wanted = _HASH_SUFFIX.sub("", value.strip())
        for title in titles:
            if wanted in _aliases(title) or _EXTENSION.sub("", wanted) in _aliases(title):
                return title
    shown = repr(value)[:80]
    listed = ", ".join(repr(title) for title in titles)
    raise APIError(
        400,
        f"{param}: no checkpoint {shown} here; this server serves {listed} (GET /sdapi/v1/sd-models)",
        param=param,
        code="model_not_found",
    )


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="unsupported_value")


def _applied(key: str, value: Any, request: Request, param: str) -> Any:
    """The value an applied option takes (its checks: the checkpoint exists, the format and counts are known)."""
    if key == CHECKPOINT_FIELD:
        return resolve_checkpoint(value, request, param)
    if key == "samples_format":
        if not isinstance(value, str) or value.lower() not in FORMATS:
            raise _bad(param, "must be png, jpg, jpeg or webp")
        return value.lower()
    if key == "show_progress_every_n_steps":
        if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 1000:
            raise _bad(param, "must be an integer between -1 and 1000 (0 or -1: no previews)")
        return value
    if not isinstance(value, bool):  # live_previews_enable
        raise _bad(param, "must be true or false")
    return value


APPLIED = (CHECKPOINT_FIELD, "samples_format", "show_progress_every_n_steps", "live_previews_enable")


def check_settings(values: dict[str, Any], request: Request, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """The options ``values`` sets, checked: (the applied ones with their values, the keys ignored). A checkpoint
    value that changes nothing (``""``) is left out. 400 naming the first option that cannot apply."""
    applied: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in values.items():
        param = f"{prefix}{key}"[:64]
        if key in APPLIED:
            resolved = _applied(key, value, request, param)
            if resolved is not None:
                applied[key] = resolved
        elif key in NEUTRAL:
            allowed, why = NEUTRAL[key]
            if value not in allowed or isinstance(value, bool):
                raise _bad(param, why)
        elif key != "sd_checkpoint_hash":
            ignored.append(key[:64])
    return applied, ignored
