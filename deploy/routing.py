"""Scale-out by model, the proxy's half: which model a request is for, told to Ray's router before it picks a replica.

Ray Serve routes a request that carries a ``serve_multiplexed_model_id`` header to a replica that reported holding
that model id (``ray/serve/_private/request_router/request_router.py``, ``apply_multiplex_routing``): first the
replicas holding it; when none does (or those are full), the replicas holding the fewest models; after about a second
of no luck, any replica. A replica reports the ids its ``@serve.multiplexed`` loader holds (``deploy/multiplex.py``).
A request without the header goes to any replica, as with one model.

Here, in Ray's HTTP proxy (``deploy/proxy.py`` installs it), the header is set from the request itself: a POST's JSON
``model`` (native, OpenAI generations, jobs), an A1111 body's ``override_settings.sd_model_checkpoint`` (a configured
name, with or without a ``[hash]`` or a file extension), or a multipart form's ``model`` field (OpenAI edits and
variations). The name is resolved as the server resolves it (``api.models.ServerModels``: a configured model, an
adapter's base model, anything else the default model, or no header when ``--strict-model-names`` will answer 404);
a POST that names no model is for the default model. A client's own header is dropped: the proxy owns it. The body
is read before the request goes on, up to ``SCAN_LIMIT`` bytes (a multipart form only until its ``model`` field),
then handed on unchanged; a body that does not say within that goes on without the header.

The proxy learns the configured names from ``SD3_MODEL_ROUTES`` in its environment (``ModelRoutes`` as JSON);
``python deploy/ray_serve.py`` sets it for the cluster it starts when it serves several models. Unset (one model, or
a cluster started without it): requests pass unchanged, each replica still serves any model, without the locality.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_HEADER",
    "ROUTES_VARIABLE",
    "SCAN_LIMIT",
    "ModelRouting",
    "ModelRoutes",
    "model_routes",
    "replay",
]

ROUTES_VARIABLE = "SD3_MODEL_ROUTES"
# Ray's header name (ray.serve._private.constants.SERVE_MULTIPLEXED_MODEL_ID); its proxy also accepts dashes.
MODEL_HEADER = b"serve_multiplexed_model_id"
SCAN_LIMIT = 1024 * 1024  # bytes of body read for the model, as deploy/proxy.py keeps for a replay
_HEADER_FORMS = {MODEL_HEADER, MODEL_HEADER.replace(b"_", b"-")}
_HASH_SUFFIX = re.compile(r"\s*\[[^\]]*\]$")
_EXTENSION = re.compile(r"\.(safetensors|ckpt|pt|bin)$", re.IGNORECASE)
_BOUNDARY = re.compile(rb"boundary=\"?([^\";]+)\"?", re.IGNORECASE)


@dataclass(frozen=True)
class ModelRoutes:
    """The server's model names as the proxy needs them: every model, the default, the strict rule, each model's
    configured adapters (an adapter's name routes to its base model)."""

    models: list[str]
    default: str
    strict: bool = False
    adapters: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelRoutes:
        data = json.loads(text)
        return cls(list(data["models"]), str(data["default"]), bool(data.get("strict")), dict(data.get("adapters", {})))

    def resolve(self, requested: str | None) -> str | None:
        """The model id a request for ``requested`` goes to (the server's own rule), or None (strict: unknown)."""
        from api.errors import APIError
        from api.models import ServerModels

        names = ServerModels(self.models, self.default, self.strict, lambda name: self.adapters.get(name, []), True)
        try:
            return names.resolve(requested)
        except APIError:
            return None

    def checkpoint(self, value: Any) -> str | None:
        """The configured model an A1111 ``sd_model_checkpoint`` names, or None."""
        if not isinstance(value, str):
            return None
        wanted = _HASH_SUFFIX.sub("", value.strip())
        for name in (wanted, _EXTENSION.sub("", wanted), _EXTENSION.sub("", wanted.rsplit("/", 1)[-1])):
            if name in self.models:
                return name
        return None


def model_routes(settings: Any) -> ModelRoutes | None:
    """The routes of a server of several models (None for one model: nothing to route by)."""
    if not settings.several_models:
        return None
    from api.models import server_models

    names = server_models(settings)
    adapters = {name: found for name in names.names if (found := names.adapters_of(name))}
    return ModelRoutes(list(names.names), names.default, names.strict, adapters)


def routes_from_environment() -> ModelRoutes | None:
    text = os.environ.get(ROUTES_VARIABLE, "").strip()
    if not text:
        return None
    try:
        return ModelRoutes.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        logger.error("%s is not a model routes JSON (%s): requests are not routed by model", ROUTES_VARIABLE, exc)
        return None


class ModelRouting:
    """Pure ASGI middleware for Ray's proxy: sets ``serve_multiplexed_model_id`` (see the module's docstring)."""

    def __init__(self, app: ASGIApp, routes: ModelRoutes | None = None) -> None:
        self.app = app
        self.routes = routes if routes is not None else routes_from_environment()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.routes is None:
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _HEADER_FORMS]
        model, read = None, []
        if scope["method"] == "POST":
            model, read = await self._model_of(headers, receive)
        if model is not None:
            headers.append((MODEL_HEADER, model.encode()))
        await self.app({**scope, "headers": headers}, replay(read, receive), send)

    async def _model_of(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> tuple[str | None, list[Message]]:
        """The model id of the request's body, and the body's messages read to find it (handed on unchanged)."""
        assert self.routes is not None
        kind = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
        boundary = _BOUNDARY.search(kind) if kind.startswith(b"multipart/form-data") else None
        read: list[Message] = []
        body = b""
        while True:
            message = await receive()
            read.append(message)
            body += message.get("body", b"")
            if boundary is not None and (found := _form_model(body, boundary.group(1))) is not None:
                return self.routes.resolve(found), read
            if message["type"] != "http.request" or len(body) > SCAN_LIMIT:
                return None, read  # gone, or too long to say: no header, the replica decides
            if not message.get("more_body"):
                break
        if boundary is not None:
            return self.routes.resolve(None), read  # a form with no model field: the default model
        return self.routes.resolve(_json_model(body, self.routes)), read


def _json_model(body: bytes, routes: ModelRoutes) -> str | None:
    """The model a JSON body names (its ``model``, else an A1111 checkpoint), or None (none named, or not JSON)."""
    try:
        data = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    settings = data.get("override_settings")
    checkpoint = routes.checkpoint(settings.get("sd_model_checkpoint")) if isinstance(settings, dict) else None
    model = data.get("model")
    return checkpoint or (model if isinstance(model, str) else None)


def _form_model(body: bytes, boundary: bytes) -> str | None:
    """A multipart form's ``model`` field, once its whole part is in ``body``; else None."""
    pattern = rb"--" + re.escape(boundary) + rb"\r\nContent-Disposition: form-data; name=\"model\"\r\n"
    found = re.search(pattern + rb"(?:[^\r\n]+\r\n)*\r\n(.{0,256}?)\r\n--" + re.escape(boundary), body, re.S | re.I)
    return found.group(1).decode("utf-8", "replace").strip() if found else None


def replay(read: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the messages already ``read`` again, then the rest of the request."""
    pending = list(read)

    async def replay_receive() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay_receive
