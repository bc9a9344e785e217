"""Middleware for Ray Serve's HTTP proxy: a replica that dies mid-request, Ray's own overload answers, and (several
models) the header that routes a request to a replica holding its model (``deploy/routing.py``).

Ray loads it in its proxy actor when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deploy.proxy:proxy_middlewares``
is in the environment of the Ray processes (``deploy/ray_serve.py`` sets it for the cluster it starts; see
docs/operations/scaling-out.md). Without it everything works but these cases: Ray answers the first two in plain
text, and routes a request for any model to any replica.

- A replica that dies before answering (killed, out of memory, its node lost) ends the request with no response at
  all, which Ray's HTTP server turns into a bare ``500 Internal Server Error``. Here the request is sent again, to
  another replica (Ray's router has marked the dead one), up to ``ATTEMPTS`` times; then a 503 in the envelope with
  ``Retry-After``. Replaying is safe: a generation changes nothing but the images it saves, the same seed gives the
  same image on any replica, and only requests whose body was small enough to keep are replayed.
- Ray's own 503s (its router's queue full: ``max_queued_requests``; no replica running) are plain text; they get
  the envelope here, with ``Retry-After``. A 503 from a replica (it has an ``X-Replica`` header) passes unchanged.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from deploy.routing import ModelRouting, replay

logger = logging.getLogger(__name__)

__all__ = ["ATTEMPTS", "ReplicaFailover", "proxy_middlewares"]

ATTEMPTS = 3
REPLAY_LIMIT = 1024 * 1024  # bytes of body kept for a replay; the server's own limit (--max-body-bytes) is 64 KiB
REPLICA_HEADER = b"x-replica"


def proxy_middlewares() -> list[Middleware]:
    """Ray's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the model's header first (several
    models: ``deploy/routing.py``), so a replayed request goes to a replica holding its model too."""
    return [Middleware(ModelRouting), Middleware(ReplicaFailover)]


class ReplicaFailover:
    """Replays a request whose replica died before answering; answers Ray's own 503s in the error envelope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kept: list[Message] = []  # the request's body messages, for a replay
        replayable = True

        async def recording_receive() -> Message:
            nonlocal replayable
            message = await receive()
            if message["type"] == "http.request" and replayable:
                kept.append(message)
                replayable = sum(len(m.get("body", b"")) for m in kept) <= REPLAY_LIMIT
            return message

        for attempt in range(1, ATTEMPTS + 1):
            answer = _Answer(scope, send)
            await self.app(scope, recording_receive if attempt == 1 else replay(kept, receive), answer.send)
            if answer.started:
                return
            if not replayable or attempt == ATTEMPTS:
                break
            logger.warning("%s %s: the replica stopped before answering; retrying", scope["method"], scope["path"])
            await asyncio.sleep(0.2 * attempt)  # let Ray's controller notice the dead replica
        await _answer_503(scope, send, "The replica serving this request stopped; retry.", "replica_failed")


class _Answer:
    """Passes a response on; holds Ray's own plain-text 503 and answers it in the envelope instead."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self._scope, self._send = scope, send
        self.started = False
        self._replaced = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = message.get("headers", [])
            if message.get("status") == 503 and not any(k.lower() == REPLICA_HEADER for k, _ in headers):
                self._replaced = True
                retry = next((v.decode() for k, v in headers if k.lower() == b"retry-after"), "1")
                await _answer_503(self._scope, self._send, "The server is busy. Retry later.", "queue_full", retry)
                return
        if self._replaced:
            return  # the body of the answer replaced above
        await self._send(message)


async def _answer_503(scope: Scope, send: Send, message: str, code: str, retry_after: str = "1") -> None:
    kind = "overloaded_error" if code == "queue_full" else "unavailable"
    await error_response(503, message, kind, None, code, **{"Retry-After": retry_after})(scope, _no_body, send)


async def _no_body() -> Message:  # a response never reads the request
    return {"type": "http.disconnect"}
