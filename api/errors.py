"""The one error envelope, ``{"error": {"message", "type", "param", "code"}}``, and the handlers that answer it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.limits import limit_messages
from api.misses import MissLog
from api.schemas import ErrorBody
from jobs.errors import StoreRefused, StoreUnavailable, TooManyJobs

logger = logging.getLogger(__name__)

__all__ = [
    "ERROR_RESPONSES",
    "APIError",
    "ErrorResponse",
    "envelope",
    "error_response",
    "install_error_handlers",
    "internal_error",
    "param_of",
]


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error answered to the client as it is (its message is safe to show)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - the envelope's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def internal_error(request_id: str) -> APIError:
    """The answer to an unexpected failure: a request id to find it in the log, never the exception's text."""
    return APIError(500, f"Internal server error (request id {request_id}).", "server_error", code="internal_error")


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:  # noqa: A002
    """The error envelope's body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None, **headers: str
) -> JSONResponse:  # noqa: A002
    return JSONResponse(envelope(message, type, param, code), status_code=status, headers=headers or None)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid input; the message says how to fix it",
        401: "Missing or wrong API key",
        413: "Request body too large",
        500: "Unexpected failure; the message carries a request id for the logs",
        503: "Overloaded (queue full), loading, draining or out of memory; retry after Retry-After seconds",
        504: "The request's deadline passed; its generation was stopped",
    }.items()
}


_BOUND_ERRORS = frozenset({"less_than_equal", "less_than", "greater_than_equal", "greater_than", "string_too_long"})


def param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # Bounded: an unknown key is client input, and answers never echo unbounded input.
    return ".".join(parts)[:64] or None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A short, safe message from pydantic errors: field and rule, never the submitted value."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = param_of(tuple(first.get("loc", ())))
    if param is None and tuple(first.get("loc", ())) == ("body",):
        # Missing body, a JSON array/string, or a non-JSON Content-Type: pydantic's text names no field here.
        return 'The body must be a JSON object (Content-Type: application/json), e.g. {"prompt": "a fox"}.', None
    msg = str(first.get("msg", "invalid value"))[:200]
    if first.get("type") == "missing":
        msg = "this field is required"
    elif first.get("type") == "extra_forbidden":
        msg = "unknown field; the accepted fields are listed at /docs"
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem(s))"
    return text, param


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the envelope: ours, the job service's (a full or unreachable store: 503), validation,
    Starlette's HTTP errors, and anything unexpected."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, **exc.headers)

    @app.exception_handler(TooManyJobs)
    async def too_many_jobs(request: Request, exc: TooManyJobs) -> JSONResponse:
        return error_response(
            503, exc.message, "overloaded_error", None, "too_many_jobs", **{"Retry-After": str(exc.retry_after)}
        )

    @app.exception_handler(StoreUnavailable)
    async def job_store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # StoreRefused too: a store that refuses writes (a full disk, Redis at maxmemory) is as transient for the
        # client; the backends' reasons name no file.
        if isinstance(exc, StoreRefused):
            message, retry = f"The job store refuses writes ({exc}). Retry later.", "5"
        else:
            message, retry = f"The job store is unavailable ({exc}). Retry later.", "2"
        return error_response(503, message, "unavailable", None, "job_store_unavailable", **{"Retry-After": retry})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message, param = validation_message(errors)
        if errors[0].get("type") in _BOUND_ERRORS and param is not None:
            # Past the schema's hard bound: say what this server accepts (its configured limit), as the configured
            # check does, never pydantic's "<= 64".
            state = request.app.state
            accepted = limit_messages(state.settings, getattr(state, "geometry", None)).get(param)
            if accepted is not None:
                message = f"{param}: {accepted}" + (f" (and {len(errors) - 1} more problem(s))" if errors[1:] else "")
        return error_response(400, message, "invalid_request_error", param, "invalid_value")

    misses = MissLog("no route")  # this app's own: several apps in one process never mix their counts

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            misses.note(exc.status_code, request.method, request.url.path)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = "Not found." if exc.status_code == 404 else str(exc.detail)[:200]
        if exc.status_code == 404 and len(request.url.path) > 1 and request.url.path.endswith("/"):
            message = "Not found. Paths have no trailing slash."  # no redirect (create_app): say why instead
        return error_response(exc.status_code, message, kind, None, None, **(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        logger.exception("request %s failed", request_id)
        error = internal_error(request_id)
        # This handler answers from Starlette's outermost middleware, outside RequestIdMiddleware: set the header here.
        return error_response(
            error.status, error.message, error.type, error.param, error.code, **{"X-Request-ID": request_id}
        )
