"""The browser's rules for the docs (Swagger UI at ``/docs``, its assets under ``/docs/static/``, ``/openapi.json``).

The docs share their origin with the playground (``/ui``), which may keep the API key in ``localStorage``; a page
on this origin that another site can frame, or that runs script it was not sent by this server, puts that key at
risk. So the docs get the playground's headers (``api/routes/ui.py``): ``frame-ancestors 'none'``, ``nosniff``, no
referrer, and a Content-Security-Policy that allows only what Swagger UI needs: its script and style sheet from
here, its one inline script (allowed by its hash, so no other inline script runs), ``data:`` images (its icons),
and requests to this server only (the schema, and "Try it out").
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DocsHeadersMiddleware", "docs_policy"]

DOCS_PAGES = frozenset({"/docs", "/docs/oauth2-redirect"})
DOCS_FILES = ("/docs/static/", "/openapi.json")
COMMON = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# A JSON document or a static file: nothing in it may run, and nothing may frame it.
FILE_POLICY = "default-src 'none'; frame-ancestors 'none'"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_policy(html: bytes) -> str:
    """The Content-Security-Policy for a docs page: its inline scripts are allowed by their SHA-256, nothing else."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self'{hashes}; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class DocsHeadersMiddleware:
    """Adds the docs' security headers (see the module's notes). A docs page is buffered (a few KB of HTML) to hash
    its inline script; files pass through as they stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path in DOCS_PAGES:
            await self._page(scope, receive, send)
        elif path.startswith(DOCS_FILES):
            await self.app(scope, receive, _with_headers(send, {**COMMON, "Content-Security-Policy": FILE_POLICY}))
        else:
            await self.app(scope, receive, send)

    async def _page(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message | None = None
        body = bytearray()

        async def buffering_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            if start is None:  # not ASGI (the start comes first): nothing sensible to add to
                return
            headers = {**COMMON, "Cache-Control": "no-cache", "Content-Security-Policy": docs_policy(bytes(body))}
            await send(_add(start, headers))
            await send({"type": "http.response.body", "body": bytes(body), "more_body": False})

        await self.app(scope, receive, buffering_send)


def _add(start: Message, headers: dict[str, str]) -> Message:
    """``start`` with ``headers`` added, replacing any of the same names."""
    names = {name.lower().encode() for name in headers}
    kept = [(name, value) for name, value in start.get("headers", []) if name.lower() not in names]
    added = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    return {**start, "headers": [*kept, *added]}


def _with_headers(send: Send, headers: dict[str, str]) -> Send:
    async def sending(message: Message) -> None:
        await send(_add(message, headers) if message["type"] == "http.response.start" else message)

    return sending
