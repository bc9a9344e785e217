"""Pure ASGI middleware (so the disconnect watcher sees the real receive channel): request ids, body limits, the API
key check, HEAD as GET, and the answer to requests still open when a drain ends."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import secrets
import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.misses import MissLog

__all__ = [
    "ApiKeyMiddleware",
    "BodyLimitMiddleware",
    "METRICS_PATH",
    "HeadAsGetMiddleware",
    "RequestIdMiddleware",
    "StopOnShutdownMiddleware",
    "is_public",
]

# What anyone may read without the key, and why:
# - /health and /ready: orchestrators probe them without credentials; they say "ok" or a state, nothing more.
# - / : the welcome document (the served model name and where the docs are).
# - /docs (and its Swagger UI assets under /docs/static/), /openapi.json: the API's shape and the configured limits,
#   which clients need to call it; no secrets, no state.
# - /ui (and its script and style sheet under /ui/static/): the playground page, the same files for everyone; the API
#   calls it makes carry the key the user types in, so the page gives nothing away. /ui/limits: its form's defaults
#   and bounds, the configured limits /openapi.json publishes already (plus the model's native size).
# - /images/<name>: each name is 128 random bits, handed only to the client that generated the image, so the URL
#   itself is the credential (a browser's <img> tag cannot send a bearer header).
# - /metrics, unless --metrics-auth: counters and timings only (no prompt, id or path in any label), and the scrapers
#   of many monitoring setups are configured without credentials. --metrics-auth guards it like /api/status.
# Everything else needs the key: generation (it spends the accelerator), /api/status (load, memory and request
# counters tell an outsider when and how the server is used), /v1/models, and unknown paths (no probing for routes).
PUBLIC_PATHS = frozenset(
    {"/", "/health", "/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/ui", "/ui/limits"}
)
PUBLIC_PREFIXES = ("/images/", "/docs/static/", "/ui/static/")
METRICS_PATH = "/metrics"
# The AUTOMATIC1111 API's paths: its clients authenticate with HTTP Basic (A1111's --api-auth user:password), so
# there Basic credentials carrying the key are accepted as well as Bearer (api/routes/a1111.py).
BASIC_PREFIX = "/sdapi/"


def is_public(path: str) -> bool:
    """Whether ``path`` is answered without the API key (see the notes above; /metrics depends on the settings)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class ApiKeyMiddleware:
    """With ``--api-key`` set, answers 401 to a request for a guarded path without ``Authorization: Bearer <key>``
    (on the A1111 API's paths, HTTP Basic carrying the key too), before its body is read or parsed.
    ``open_metrics``: /metrics is public too."""

    def __init__(self, app: ASGIApp, api_key: str, open_metrics: bool = True) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.open_metrics = open_metrics
        self.refusals = MissLog("no valid API key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        public = is_public(path) or (self.open_metrics and path == METRICS_PATH)
        basic = path.startswith(BASIC_PREFIX)
        if scope["type"] != "http" or public or self._authorised(scope, basic):
            await self.app(scope, receive, send)
            return
        self.refusals.note(401, scope.get("method", ""), path)
        how = "'Authorization: Bearer <key>'" + (", or HTTP Basic with the key as the password" if basic else "")
        refusal = error_response(
            401,
            f"Missing or invalid API key: send {how}.",
            "authentication_error",
            code="invalid_api_key",
            **{"WWW-Authenticate": 'Basic realm="sdapi"' if basic else "Bearer"},
        )
        await refusal(scope, receive, send)

    def _authorised(self, scope: Scope, basic: bool) -> bool:
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        scheme, token = scheme.lower(), token.strip()
        # compare_digest: the time taken must not tell an attacker how much of a guessed key was right.
        if scheme == b"bearer":
            return secrets.compare_digest(token, self.api_key)
        return basic and scheme == b"basic" and self._basic_carries_key(token)

    def _basic_carries_key(self, token: bytes) -> bool:
        """HTTP Basic credentials carry the key as their password (any user name), or as the whole ``user:password``
        (a key set to what A1111's ``--api-auth`` was); both compared in constant time, whatever the first says."""
        try:
            credentials = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            return False
        password = credentials.partition(b":")[2]
        as_password = secrets.compare_digest(password, self.api_key)
        as_whole = secrets.compare_digest(credentials, self.api_key)
        return as_password or as_whole


class HeadAsGetMiddleware:
    """Answers ``HEAD`` wherever ``GET`` is answered: routes see a GET, and the HTTP server sends no body for a HEAD
    (it keeps the request's own method, so the headers, Content-Length included, are the GET's).

    A HEAD ends with its headers: the route is stopped once they are sent, so a HEAD on a stream (a running job's
    events) does not stay open until the stream would have ended, holding its connection and what is pipelined
    behind it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        answered = asyncio.Event()

        async def send_headers_only(message: Message) -> None:
            if answered.is_set():
                return  # the body a HEAD does not get
            await send(message)
            if message["type"] == "http.response.start":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                answered.set()

        task = asyncio.ensure_future(self.app({**scope, "method": "GET"}, receive, send_headers_only))
        done = asyncio.ensure_future(answered.wait())
        try:
            await asyncio.wait({task, done}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            done.cancel()
        if not task.done():
            task.cancel()  # the route is still producing a body nobody gets (a stream): stop it
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        task.result()  # re-raises the route's exception, if any, for the error handlers


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID if sane) and returns it in X-Request-ID."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Answers 413 for bodies over ``limit`` bytes, declared or streamed, before they are buffered.

    ``upload_paths`` (the routes that take images) are held to ``upload_limit`` instead: an image is megabytes, a
    JSON body of text fields a few kilobytes, and one limit for both would be too small or too large."""

    def __init__(
        self, app: ASGIApp, limit: int, upload_limit: int | None = None, upload_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = limit if upload_limit is None else upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope.get("path", "") in self.upload_paths else self.limit
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_big = error_response(413, f"The request body is larger than {limit} bytes.", "invalid_request_error")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await too_big(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_big(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """A streamed body passed the limit. An HTTPException because FastAPI's body reader re-raises those (it turns
    any other error into a 400), so the HTTP error handler answers it with a 413 envelope."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class StopOnShutdownMiddleware:
    """Answers every request still open when ``stopped`` is set (the end of a drain) with a 503 envelope.

    The engine answers its own requests (running or queued) 503 ``draining`` when it is aborted; this covers the
    rest, e.g. a client still sending its body. Without it uvicorn cancels such a request at its own, later timeout
    and answers a plain-text 500 with a traceback in the log.
    """

    def __init__(self, app: ASGIApp, stopped: asyncio.Event, grace: float = 1.0) -> None:
        self.app = app
        self.stopped = stopped
        self.grace = grace  # how long a request gets to answer by itself once stopped (the engine's answer is ms)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        stop = asyncio.ensure_future(self.stopped.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=self.grace)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stop.cancel()
        if task.done():
            task.result()  # re-raises the app's exception, if any, for the error handlers
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not started:
            draining = error_response(
                503, "The server is draining.", "unavailable", code="draining", **{"Retry-After": "5"}
            )
            await draining(scope, receive, send)
