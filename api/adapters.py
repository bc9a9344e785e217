"""LoRA adapters in the HTTP layer: the start-up options (``--lora NAME=PATH``, ``--lora-dir``), a request's
``loras`` (and the OpenAI ``model`` field naming an adapter), their errors, and what the answers report.

The pool itself, loading and the per-pass gate are the engine's (``engine.adapters``); the engine (torch) is
imported inside the functions that need it, as in ``api.generation``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from fastapi import Request

from api.errors import APIError
from api.models import model_of

__all__ = [
    "ADAPTER_NAME",
    "adapter_error",
    "check_adapter_file",
    "loras_of",
    "model_entries",
    "parse_lora_options",
]

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SAFETENSORS_HEADER_MAX = 100_000_000  # bytes: the format's own bound on its JSON header


def check_adapter_file(path: Path) -> None:
    """Cheap checks of a LoRA file at start-up, before any model loads: it is a readable safetensors file (its
    header parses) holding LoRA tensors. ValueError naming the file and the reason."""
    from engine.adapters import adapter_file  # called after the preflight: torch is loaded by then

    file = adapter_file(path)
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if not 0 < length <= _SAFETENSORS_HEADER_MAX:
                raise ValueError("bad header length")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read ({exc.strerror})") from None
    except (ValueError, struct.error):
        raise ValueError(f"{file}: not a safetensors file") from None
    if not any("lora" in key.lower() for key in header if key != "__metadata__"):
        raise ValueError(f"{file}: holds no LoRA weights (no lora_A/lora_B or lora_up/lora_down tensors)")


def parse_lora_options(values: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` entries as {name: path}; ValueError naming the bad entry."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise ValueError(f"{value!r}: use NAME=PATH (PATH a .safetensors file or a folder holding one)")
        if not ADAPTER_NAME.match(name):
            raise ValueError(f"{name!r}: an adapter name is 1-64 letters, digits, '.', '_' or '-'")
        if name in adapters:
            raise ValueError(f"adapter {name!r} is named twice")
        adapters[name] = Path(path).expanduser()
    return adapters


def loras_of(request: Request, body: Any) -> tuple[tuple[str, float], ...]:
    """The request's adapter set, in order: the OpenAI ``model`` naming an adapter first (at scale 1), then
    ``loras``, all of the model the request runs on (``api.models``). 400 naming the adapter the model does not have
    (and the model it belongs to, if another); a model's name (or any other unknown ``model``, e.g. ``dall-e-3``)
    adds nothing."""
    chosen: list[tuple[str, float]] = []
    view = model_of(request)
    model = getattr(body, "model", None)
    if model == view.name or model in request.app.state.models.names:
        model = None
    loras = getattr(body, "loras", None) or []
    if not model and not loras:
        return ()  # the common case: no adapter, and no look at the adapter directory on the request path
    pool = view.adapters
    names = pool.names() if pool is not None else []
    if model and model in names:
        chosen.append((model, 1.0))
    for i, lora in enumerate(loras):
        owner = request.app.state.models.owner_of(lora.name)
        if lora.name not in names and owner is not None:
            raise APIError(
                400,
                f"loras[{i}].name: LoRA adapter {lora.name!r} belongs to model {owner!r}, not to {view.name!r}; "
                f"name model {owner!r} to use it",
                param=f"loras[{i}].name",
                code="adapter_of_another_model",
            )
        if lora.name not in names:
            listed = ", ".join(names) if names else "none are configured (--lora, --lora-dir)"
            raise APIError(
                400,
                f"loras[{i}].name: unknown LoRA adapter {lora.name!r}; known adapters: {listed}",
                param=f"loras[{i}].name",
                code="unknown_adapter",
            )
        if any(name == lora.name for name, _ in chosen):
            message = f"loras[{i}]: adapter {lora.name!r} is named twice"
            raise APIError(400, message, param="loras", code="invalid_value")
        chosen.append((lora.name, float(lora.scale)))
    if pool is not None:
        try:
            pool.check(tuple(chosen))  # a set the pool can never hold is refused now, not 503 for ever
        except Exception as exc:
            error = adapter_error(exc)
            if error is None:
                raise
            raise error from None
    return tuple(chosen)


def adapter_error(exc: Exception) -> APIError | None:
    """The envelope for the engine's adapter failures (None: not one of them)."""
    from engine.adapters import AdapterPoolFull, AdapterUnloadable, TooManyAdapters, UnknownAdapter

    if isinstance(exc, UnknownAdapter):
        return APIError(400, f"{exc}.", param="loras", code="unknown_adapter")
    if isinstance(exc, TooManyAdapters):
        return APIError(400, f"loras: {exc}.", param="loras", code="too_many_adapters")
    if isinstance(exc, AdapterPoolFull):
        return APIError(503, f"{exc}.", "overloaded_error", code="adapters_busy", headers={"Retry-After": "1"})
    if isinstance(exc, AdapterUnloadable):
        # The reason (with the server's path) is in the server's log; the client gets the name only.
        return APIError(400, f"LoRA adapter {exc.name!r} cannot be loaded.", param="loras", code="adapter_unloadable")
    return None


def model_entries(request: Request, created: int) -> list[dict[str, Any]]:
    """``GET /v1/models``: every model (loaded or not; the default first), each followed by its adapters (of the
    models loaded at least once), each naming its model as its ``parent``."""
    models = request.app.state.models
    entries = []
    for base in [models.default, *(name for name in models.names if name != models.default)]:
        entries.append({"id": base, "object": "model", "created": created, "owned_by": "local"})
        for name in models.adapters_of(base):
            entries.append(
                {"id": name, "object": "model", "created": created, "owned_by": "local", "parent": base, "root": base}
            )
    return entries
