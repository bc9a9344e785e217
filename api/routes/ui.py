"""The playground page: ``GET /ui`` and its own script and style sheet under ``/ui/static/``.

Everything the page needs ships in ``api/static/ui/`` (found next to this package, never from the working
directory) and is served from here: no CDN, no web fonts, so the page works with no network. The page itself is
public (like ``/docs``); the API calls it makes send the key the user types in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.errors import APIError
from api.limits import form_limits

__all__ = ["STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"

# The only files served, by name: nothing a request names can reach another path.
_ASSETS = {
    "ui.js": "text/javascript; charset=utf-8",
    "edit.js": "text/javascript; charset=utf-8",
    "adapters.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


def _security_headers(request: Request) -> dict[str, str]:
    """The page may run only its own script and style and talk only to this server; images may also come from
    ``--public-url`` (the result URLs) and ``data:`` (previews arrive as base64 PNGs)."""
    images = "'self' data:"
    public_url = request.app.state.settings.public_url
    if public_url:
        parts = urlsplit(public_url)
        images += f" {parts.scheme}://{parts.netloc}"
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        f"img-src {images}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


@router.get("/ui", summary="The playground page")
async def page(request: Request) -> Response:
    body = (STATIC_DIR / "index.html").read_bytes()
    return Response(body, media_type="text/html; charset=utf-8", headers=_security_headers(request))


@router.get("/ui/limits", summary="The playground form's defaults and limits")
async def limits(request: Request) -> dict[str, Any]:
    """The form's defaults and bounds, without the key (they are in /openapi.json for anyone already), so a page
    opened on a server with --api-key shows a usable form before a key is typed; /api/status stays behind it."""
    state = request.app.state
    return form_limits(state.settings, getattr(state, "geometry", None))


@router.get("/ui/static/{name}", summary="The playground's script and style sheet")
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, "No such file.", "not_found_error", param="name", code="not_found")
    # no-cache: the browser revalidates, so a new version of the page never runs with an old script.
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=headers)
