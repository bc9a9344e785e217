"""What route handlers share: the ready engine, request ids, base URLs, disconnect watching.

Each reads its collaborators from ``request.app.state`` (set by ``api.app.create_app`` and ``api.loading``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import Request

from api.errors import APIError

__all__ = ["base_url", "ready_engine", "request_id", "watch_disconnect"]


def ready_engine(request: Request) -> Any:
    """The engine, or a 503 envelope while the model is loading (or failed to load)."""
    state = request.app.state
    if state.engine is None:
        code = "load_failed" if state.load_error is not None else "loading"
        raise APIError(503, f"The model is not ready ({code}).", "unavailable", code=code, headers={"Retry-After": "5"})
    return state.engine


def request_id(request: Request) -> str:
    """The id ``RequestIdMiddleware`` gave this request."""
    return getattr(request.state, "request_id", "") or uuid.uuid4().hex


def base_url(request: Request) -> str:
    """The URL prefix the client can reach: --public-url, else the Host the client itself used."""
    public_url = request.app.state.settings.public_url
    if public_url:
        return public_url
    return str(request.base_url).rstrip("/")


def watch_disconnect(request: Request, gone: asyncio.Event | None = None) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """An event set when the client goes away (the body has been read, so the next message is a disconnect).

    ``gone``: an event of the caller's to set (it may set it too, e.g. when a stream's body is abandoned)."""
    gone = asyncio.Event() if gone is None else gone

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    return gone, asyncio.create_task(watch())
