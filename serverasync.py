"""HTTP front of the SD3 inference server: settings, app factory, schemas, routes, errors, CLI.

``python serverasync.py --model random:tiny`` serves offline. Importing this module loads nothing: the model is
loaded by the app's lifespan (in the background, so ``/health`` answers and ``/ready`` says 503 meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import psutil
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("serverasync")

ENV_PREFIX = "SERVER_"


# ---------------------------------------------------------------------------------------------------------
# Settings: every option is a CLI flag and an environment variable (SERVER_<NAME>), validated before loading.
# ---------------------------------------------------------------------------------------------------------


class Settings(BaseSettings):
    """Server configuration. CLI flags override environment variables, which override defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    model: str = Field(
        "stabilityai/stable-diffusion-3.5-medium",
        validation_alias=AliasChoices("model", f"{ENV_PREFIX}MODEL", "MODEL_PATH"),
        description="hub id, local save_pretrained directory, or random:tiny / random:sd3.5-medium "
        "(env SERVER_MODEL or MODEL_PATH)",
    )
    type_models: str = Field("t2im", description="pipeline type; only t2im (text-to-image) today")
    host: str = Field("0.0.0.0", description="address to bind")
    port: int = Field(8500, ge=0, le=65535, description="port to bind (0: any free port)")
    device: str | None = Field(None, description="cuda, cuda:1, mps or cpu (default: cuda, then mps, then cpu)")
    dtype: str | None = Field(None, description="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    image_dir: str = Field("images", description="directory for generated images")
    public_url: str | None = Field(
        None, description="base URL put in image links, e.g. https://img.example.com (default: the request's host)"
    )
    max_concurrency: int | None = Field(
        None,
        ge=1,
        le=256,
        description="generations running at once (default: 2; on a CPU the cores are split between them)",
    )
    max_queue: int = Field(64, ge=0, le=100_000, description="requests that may wait for a slot; beyond: 503")
    request_timeout: float = Field(300.0, ge=0, description="seconds before a request is answered 504 (0: none)")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds to let in-flight requests finish on SIGTERM")
    image_ttl: float = Field(86_400.0, ge=0, description="seconds generated images are kept (0: forever)")
    image_max_files: int = Field(10_000, ge=0, description="most images kept on disk, oldest go first (0: no cap)")
    image_max_bytes: int = Field(0, ge=0, description="most bytes of images kept on disk, oldest go first (0: no cap)")
    api_key: str | None = Field(None, description="if set, generation endpoints need 'Authorization: Bearer KEY'")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS ('*' allows any, no cookies)")
    max_steps: int = Field(100, ge=1, le=1000, description="largest num_inference_steps accepted")
    default_steps: int = Field(28, ge=1, le=1000, description="num_inference_steps when the request has none")
    max_image_size: int = Field(1536, ge=16, le=8192, description="largest width or height accepted (pixels)")
    max_images_per_request: int = Field(10, ge=1, le=64, description="largest num_images_per_prompt / n accepted")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000, description="longest prompt accepted (characters)")
    max_body_bytes: int = Field(65_536, ge=1024, description="largest request body accepted (bytes); beyond: 413")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("public_url must start with http:// or https:// and name a host")
        return value.rstrip("/") if value else value

    @field_validator("type_models")
    @classmethod
    def _check_type(cls, value: str) -> str:
        if value != "t2im":
            raise ValueError("type_models must be 't2im' (text-to-image)")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return value.lower()

    @model_validator(mode="after")
    def _check_steps(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) is above max_steps ({self.max_steps})")
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Build Settings from the command line (flags named after the fields) over the environment."""
    parser = argparse.ArgumentParser(
        prog="serverasync.py",
        description="Async inference server for Stable Diffusion 3 / 3.5. Every flag is also an environment "
        f"variable: {ENV_PREFIX}<FLAG_IN_CAPITALS>, e.g. {ENV_PREFIX}MAX_QUEUE=16.",
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default
        parser.add_argument(flag, dest=name, default=None, help=f"{info.description} [default: {default}]")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**args)


# ---------------------------------------------------------------------------------------------------------
# Errors: one envelope everywhere, {"error": {"message", "type", "param", "code"}}.
# ---------------------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


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


def error_response(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None, **headers: str
) -> JSONResponse:  # noqa: A002
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


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


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # Bounded: an unknown key is client input, and answers never echo unbounded input.
    return ".".join(parts)[:64] or None


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A short, safe message from pydantic errors: field and rule, never the submitted value."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = _param_of(tuple(first.get("loc", ())))
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


# ---------------------------------------------------------------------------------------------------------
# ASGI middleware: request ids and body limits (pure ASGI, so the disconnect watcher sees the real channel).
# ---------------------------------------------------------------------------------------------------------

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
    """Answers 413 for bodies over ``limit`` bytes, declared or streamed, before they are buffered."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_big = error_response(413, f"The request body is larger than {self.limit} bytes.", "invalid_request_error")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await too_big(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(self.limit)
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


# ---------------------------------------------------------------------------------------------------------
# Schemas. Hard bounds live in the schema; the configured (tighter) limits are checked in `to_generation`.
# ---------------------------------------------------------------------------------------------------------

Prompt = Annotated[str, Field(min_length=1, max_length=100_000)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="seed for reproducible images; drawn when absent")]
Steps = Annotated[int, Field(ge=1, le=1000)]
Side = Annotated[int, Field(ge=16, le=8192, description="pixels, a multiple of 16")]
Guidance = Annotated[float, Field(ge=0.0, le=50.0)]


class InferenceRequest(BaseModel):
    """Body of POST /api/diffusers/inference."""

    # strict: `true` is not 1 step and "5" is not a seed; JSON numbers still fill float fields.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    negative_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    num_inference_steps: Steps | None = Field(None, description="default: the server's --default-steps")
    num_images_per_prompt: Annotated[int, Field(ge=1, le=64)] = 1
    seed: Seed | None = None
    guidance_scale: Guidance | None = Field(None, description="default: the pipeline's (7.0 for SD3)")
    height: Side | None = Field(None, description="default: the model's native size")
    width: Side | None = Field(None, description="default: the model's native size")


class ResolvedParameters(BaseModel):
    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    num_images_per_prompt: int
    guidance_scale: float | None
    height: int
    width: int


class InferenceResponse(BaseModel):
    response: list[str] = Field(description="absolute URLs of the generated PNGs")
    seed: int
    parameters: ResolvedParameters
    request_id: str


class OpenAIImageRequest(BaseModel):
    """Body of POST /v1/images/generations (OpenAI Images API). Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: Prompt
    model: Annotated[str, Field(max_length=256)] | None = None
    n: Annotated[int, Field(ge=1, le=10)] = 1
    size: Annotated[str, Field(max_length=16, description="'WIDTHxHEIGHT' or 'auto'")] | None = None
    response_format: Literal["url", "b64_json"] | None = "url"
    quality: Annotated[str, Field(max_length=32)] | None = None
    style: Annotated[str, Field(max_length=32)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Extensions (send with the client's extra_body): reproducibility and sampling controls.
    seed: Seed | None = None
    negative_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


# ---------------------------------------------------------------------------------------------------------
# The app factory.
# ---------------------------------------------------------------------------------------------------------


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_concurrency(device_type: str) -> int:
    # Two slots on either: on a GPU one request's text encoding / VAE decode overlaps another's denoising; on a CPU
    # the two split the cores (Engine.cpu_threads), so one request's Python work overlaps the other's compute and
    # no OpenMP barrier waits on a thread preempted by HTTP or PNG work. Measured in bench/RESULTS.md.
    return 2 if device_type != "cpu" else min(2, _usable_cores())


def create_app(settings: Settings | None = None, loader: Callable[[Settings], Any] | None = None) -> FastAPI:
    """Build the app. ``loader(settings)`` returns a started loader with ``.pipeline`` and ``.device``
    (default: ``Pipelines.ModelPipelineInitializer``); it runs in a thread when the app starts."""
    from utils.utils import ImageStore

    settings = settings or Settings()
    store = ImageStore(
        settings.image_dir,
        ttl_seconds=settings.image_ttl,
        max_files=settings.image_max_files,
        max_bytes=settings.image_max_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.load_task = asyncio.create_task(_load(app, settings, loader))
        state.prune_task = asyncio.create_task(_prune_periodically(store, settings.image_ttl))
        try:
            yield
        finally:
            engine = state.engine
            if engine is not None:
                finished = await engine.drain(settings.shutdown_timeout)
                if not finished:
                    logger.warning("shutdown timeout: %d request(s) still running were abandoned", engine.active)
                engine.close()
            for task in (state.load_task, state.prune_task):
                task.cancel()

    app = FastAPI(
        title="SD3 async inference server",
        version="1.0.0",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.engine = None
    app.state.loaded = None
    app.state.load_error = None
    app.state.on_fatal = None

    _install_error_handlers(app)
    origins = settings.cors_origin_list
    if origins:
        # Credentials are only allowed with an explicit origin list: '*' with cookies would let any site act as
        # the user.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials="*" not in origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Seed", "Server-Timing", "Retry-After"],
        )
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    _add_routes(app, settings, store)
    _publish_limits(app, settings)
    return app


def _publish_limits(app: FastAPI, settings: Settings) -> None:
    """Put the configured limits (tighter than the schema's hard bounds) into /openapi.json and /docs."""
    build = app.openapi
    images = settings.max_images_per_request
    limits = {
        "InferenceRequest": {
            "prompt": ("maxLength", settings.max_prompt_chars),
            "negative_prompt": ("maxLength", settings.max_prompt_chars),
            "num_inference_steps": ("maximum", settings.max_steps),
            "num_images_per_prompt": ("maximum", images),
            "height": ("maximum", settings.max_image_size),
            "width": ("maximum", settings.max_image_size),
        },
        "OpenAIImageRequest": {
            "prompt": ("maxLength", settings.max_prompt_chars),
            "negative_prompt": ("maxLength", settings.max_prompt_chars),
            "num_inference_steps": ("maximum", settings.max_steps),
            "n": ("maximum", min(10, images)),
        },
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            for model, fields in limits.items():
                for field, (key, value) in fields.items():
                    prop = schemas[model]["properties"][field]
                    # An optional field is anyOf[<type>, null]: the bound sits on the typed branch.
                    for branch in prop.get("anyOf", [prop]):
                        if key in branch:
                            branch[key] = min(branch[key], value)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _load(app: FastAPI, settings: Settings, loader: Callable[[Settings], Any] | None) -> None:
    from utils import RequestScopedPipeline
    from utils.engine import Engine, pipeline_runner

    def default_loader(s: Settings) -> Any:
        from Pipelines import ModelPipelineInitializer

        return ModelPipelineInitializer(s.model, s.type_models, device=s.device, dtype=s.dtype).initialize_pipeline()

    started = time.monotonic()
    try:
        loaded = await _in_passing_thread(lambda: _start((loader or default_loader)(settings)))
    except Exception as exc:
        app.state.load_error = exc
        logger.error("model failed to load: %s", exc)
        if app.state.on_fatal is not None:
            app.state.on_fatal()
        return
    pipeline = loaded.pipeline
    device = loaded.device
    scoped = RequestScopedPipeline(pipeline)
    concurrency = settings.max_concurrency or _default_concurrency(device.type)
    engine = Engine(
        pipeline_runner(scoped, device),
        concurrency,
        settings.max_queue,
        settings.request_timeout,
        cpu_threads=_usable_cores() if device.type == "cpu" else None,
    )
    app.state.loaded = loaded
    app.state.scoped = scoped
    app.state.size_multiple = int(getattr(pipeline, "vae_scale_factor", 8)) * int(
        getattr(pipeline, "patch_size", None) or pipeline.transformer.config.patch_size
    )
    default = int(getattr(pipeline, "default_sample_size", 128)) * int(getattr(pipeline, "vae_scale_factor", 8))
    app.state.default_size = default
    # The transformer's positional embedding caps the side it can generate; beyond it the pipeline raises (a 500).
    transformer_config = getattr(getattr(pipeline, "transformer", None), "config", None)
    pos_max = getattr(transformer_config, "pos_embed_max_size", None)
    app.state.model_max_size = int(pos_max) * app.state.size_multiple if pos_max else None
    app.state.engine = engine
    engine.set_ready()
    logger.info(
        "model %s ready on %s in %.1fs (max_concurrency=%d, max_queue=%d)",
        settings.model,
        device,
        time.monotonic() - started,
        concurrency,
        settings.max_queue,
    )


async def _in_passing_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread that ends with it.

    Loading runs torch, and a live thread that once ran torch keeps an OpenMP thread team. With more OpenMP threads
    alive than cores, libgomp stops spin-waiting between the many small ops of a step, and every CPU generation ran
    ~1.5x slower (bench/RESULTS.md); ``asyncio.to_thread``'s pooled threads would live on.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn)
    finally:
        executor.shutdown(wait=False)


def _start(loader: Any) -> Any:
    return loader.start() if hasattr(loader, "start") and getattr(loader, "pipeline", None) is None else loader


async def _prune_periodically(store: Any, ttl: float) -> None:
    if ttl <= 0:
        return
    while True:
        await asyncio.sleep(min(60.0, max(1.0, ttl / 4)))
        await asyncio.to_thread(store.prune)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, **exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = "Not found." if exc.status_code == 404 else str(exc.detail)[:200]
        return error_response(exc.status_code, message, kind, None, None, **(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        logger.exception("request %s failed", request_id)
        # This handler answers from Starlette's outermost middleware, outside RequestIdMiddleware: set the header here.
        return error_response(
            500,
            f"Internal server error (request id {request_id}).",
            "server_error",
            None,
            "internal_error",
            **{"X-Request-ID": request_id},
        )


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or uuid.uuid4().hex


def _base_url(request: Request, settings: Settings) -> str:
    """The URL prefix the client can reach: --public-url, else the Host the client itself used."""
    if settings.public_url:
        return settings.public_url
    return str(request.base_url).rstrip("/")


def _watch_disconnect(request: Request) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """An event set when the client goes away (the body has been read, so the next message is a disconnect)."""
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    return gone, asyncio.create_task(watch())


def _add_routes(app: FastAPI, settings: Settings, store: Any) -> None:
    from utils.engine import (
        ClientGone,
        GenerationRequest,
        GenerationResult,
        GenerationTimeout,
        NotReady,
        OutOfMemory,
        Overloaded,
    )
    from utils.utils import build_image_url, encode_png

    async def require_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                "authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def engine_or_503() -> Any:
        engine = app.state.engine
        if engine is None:
            code = "load_failed" if app.state.load_error is not None else "loading"
            raise APIError(
                503, f"The model is not ready ({code}).", "unavailable", code=code, headers={"Retry-After": "5"}
            )
        return engine

    def to_generation(
        request_id: str,
        prompt: str,
        negative_prompt: str | None,
        steps: int | None,
        n: int,
        seed: int | None,
        guidance: float | None,
        height: int | None,
        width: int | None,
        names: dict[str, str],
    ) -> GenerationRequest:
        """Check the configured limits and resolve defaults; ``names`` maps our names to the API's params."""

        def bad(field: str, message: str) -> APIError:
            return APIError(
                400, f"{names.get(field, field)}: {message}", param=names.get(field, field), code="invalid_value"
            )

        if len(prompt) > settings.max_prompt_chars:
            raise bad("prompt", f"at most {settings.max_prompt_chars} characters; shorten the prompt")
        if negative_prompt is not None and len(negative_prompt) > settings.max_prompt_chars:
            raise bad("negative_prompt", f"at most {settings.max_prompt_chars} characters")
        if not prompt.strip():
            raise bad("prompt", "must not be blank")
        steps = settings.default_steps if steps is None else steps
        if steps > settings.max_steps:
            raise bad("steps", f"must be between 1 and {settings.max_steps}")
        if n > settings.max_images_per_request:
            raise bad("n", f"must be between 1 and {settings.max_images_per_request}")
        multiple = app.state.size_multiple
        height = app.state.default_size if height is None else height
        width = app.state.default_size if width is None else width
        max_size = min(settings.max_image_size, app.state.model_max_size or settings.max_image_size)
        for field, value in (("height", height), ("width", width)):
            if value > max_size:
                raise bad(field, f"at most {max_size} pixels")
            if value % multiple:
                lower = max(multiple, value - value % multiple)
                options = " or ".join(str(v) for v in (lower, lower + multiple) if v <= max_size)
                raise bad(field, f"must be a multiple of {multiple}; try {options}")
        return GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            num_images=n,
            seed=secrets.randbits(32) if seed is None else seed,
            guidance_scale=guidance,
            height=height,
            width=width,
            request_id=request_id,
        )

    async def run(request: Request, generation: GenerationRequest) -> GenerationResult:
        engine = engine_or_503()
        gone, watcher = _watch_disconnect(request)
        logger.info(
            "request %s: %dx%d, %d step(s), %d image(s), seed %d, prompt %.60r",
            generation.request_id,
            generation.width,
            generation.height,
            generation.num_inference_steps,
            generation.num_images,
            generation.seed,
            generation.prompt,
        )
        try:
            result = await engine.submit(generation, gone)
            if gone.is_set():
                # The client left as its generation finished: saving the images would leave files nobody can name.
                raise ClientGone
            return result
        except Overloaded:
            raise APIError(
                503,
                f"The server is busy: {engine.active} generating and {engine.queued} waiting. Retry later.",
                "overloaded_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except NotReady as exc:
            raise APIError(
                503, f"The server is {exc.reason}.", "unavailable", code=exc.reason, headers={"Retry-After": "5"}
            ) from None
        except GenerationTimeout:
            raise APIError(
                504,
                f"The request took longer than {settings.request_timeout:g}s and was stopped.",
                "timeout_error",
                code="timeout",
            ) from None
        except OutOfMemory:
            raise APIError(
                503,
                "The server ran out of memory for this request; try a smaller size or fewer images, or retry later.",
                "out_of_memory",
                code="out_of_memory",
                headers={"Retry-After": "5"},
            ) from None
        except ClientGone:
            # Nobody is listening; this answer is for the log (499: client closed request, nginx's convention).
            logger.info("request %s: client disconnected, generation stopped", generation.request_id)
            raise APIError(499, "Client closed the request.", "client_closed", code="client_closed") from None
        finally:
            watcher.cancel()

    def timing_headers(result: GenerationResult) -> dict[str, str]:
        parts = [f"queue;dur={result.queued_s * 1000:.1f}", f"generate;dur={result.generate_s * 1000:.1f}"]
        if result.first_step_s is not None:
            parts.append(f"first_step;dur={result.first_step_s * 1000:.1f}")
        return {"Server-Timing": ", ".join(parts), "X-Seed": str(result.seed)}

    async def save_all(images: list[Any]) -> list[str]:
        # PNG encoding and disk writes run off the generation slots, so the next request can already denoise.
        return await asyncio.gather(*(asyncio.to_thread(lambda im=im: store.save_png(encode_png(im))) for im in images))

    @app.get("/", summary="Welcome")
    async def root() -> dict[str, Any]:
        return {
            "message": "SD3 async inference server. POST /api/diffusers/inference or /v1/images/generations.",
            "model": settings.model,
            "docs": "/docs",
            "status": "/api/status",
        }

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 when the model is loaded and the server accepts work")
    async def ready() -> JSONResponse:
        engine = app.state.engine
        if engine is not None and engine.ready_reason is None:
            return JSONResponse({"status": "ready", "model": settings.model})
        reason = (
            engine.ready_reason
            if engine is not None
            else ("load_failed" if app.state.load_error is not None else "loading")
        )
        return error_response(503, f"Not ready: {reason}.", "unavailable", None, reason, **{"Retry-After": "5"})

    @app.get("/api/status", summary="Server status, memory and load")
    async def status() -> dict[str, Any]:
        engine = app.state.engine
        loaded = app.state.loaded
        device = str(loaded.device) if loaded is not None else (settings.device or "pending")
        return {
            "current_model": settings.model,
            "type_models": settings.type_models,
            "device": device,
            "ready": engine is not None and engine.ready_reason is None,
            "memory": _memory_info(loaded.device if loaded is not None else None),
            "total_requests": engine.stats["total"] if engine else 0,
            "active_inferences": engine.active if engine else 0,
            "queued": engine.queued if engine else 0,
            "max_concurrency": engine.max_concurrency if engine else settings.max_concurrency,
            "max_queue": settings.max_queue,
            "requests": dict(engine.stats) if engine else {},
            "images_stored": len(store),
        }

    @app.post(
        "/api/diffusers/inference",
        response_model=InferenceResponse,
        dependencies=[Depends(require_key)],
        summary="Generate images; answers their URLs",
    )
    async def inference(body: InferenceRequest, request: Request) -> JSONResponse:
        engine_or_503()
        generation = to_generation(
            _request_id(request),
            body.prompt,
            body.negative_prompt,
            body.num_inference_steps,
            body.num_images_per_prompt,
            body.seed,
            body.guidance_scale,
            body.height,
            body.width,
            {"steps": "num_inference_steps", "n": "num_images_per_prompt"},
        )
        result = await run(request, generation)
        names = await save_all(result.images)
        base = _base_url(request, settings)
        payload = InferenceResponse(
            response=[build_image_url(base, name) for name in names],
            seed=result.seed,
            parameters=ResolvedParameters(
                prompt=generation.prompt,
                negative_prompt=generation.negative_prompt,
                num_inference_steps=generation.num_inference_steps,
                num_images_per_prompt=generation.num_images,
                guidance_scale=generation.guidance_scale,
                height=generation.height,
                width=generation.width,
            ),
            request_id=generation.request_id,
        )
        return JSONResponse(payload.model_dump(), headers=timing_headers(result))

    @app.post(
        "/v1/images/generations",
        response_model=OpenAIImagesResponse,
        response_model_exclude_none=True,
        dependencies=[Depends(require_key)],
        summary="OpenAI Images API: generate images",
    )
    async def openai_generations(body: OpenAIImageRequest, request: Request) -> JSONResponse:
        engine_or_503()
        width = height = None
        if body.size and body.size != "auto":
            match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", body.size)
            if not match:
                raise APIError(
                    400, "size: use 'WIDTHxHEIGHT', e.g. '1024x1024', or 'auto'", param="size", code="invalid_value"
                )
            width, height = int(match.group(1)), int(match.group(2))
            if min(width, height) < 16:
                raise APIError(400, "size: width and height must be at least 16", param="size", code="invalid_value")
        generation = to_generation(
            _request_id(request),
            body.prompt,
            body.negative_prompt,
            body.num_inference_steps,
            body.n,
            body.seed,
            body.guidance_scale,
            height,
            width,
            {"height": "size", "width": "size", "steps": "num_inference_steps"},
        )
        result = await run(request, generation)
        if body.response_format == "b64_json":
            encoded = await asyncio.gather(*(asyncio.to_thread(encode_png, im) for im in result.images))
            data = [{"b64_json": base64.b64encode(png).decode()} for png in encoded]
        else:
            base = _base_url(request, settings)
            data = [{"url": build_image_url(base, name)} for name in await save_all(result.images)]
        return JSONResponse({"created": int(time.time()), "data": data}, headers=timing_headers(result))

    @app.get("/v1/models", summary="OpenAI-style model list (the one loaded model)")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model, "object": "model", "owned_by": "local"}]}

    @app.get(
        "/images/{filename}",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}, "description": "The PNG"}, 404: {"model": ErrorResponse}},
        summary="A generated image",
    )
    async def get_image(filename: str) -> FileResponse:
        path = store.lookup(filename)
        if path is None:
            raise APIError(404, "No such image.", "not_found_error", param="filename", code="image_not_found")
        return FileResponse(
            path,
            media_type="image/png",
            headers={"Cache-Control": "public, max-age=86400, immutable", "X-Content-Type-Options": "nosniff"},
        )


def _memory_info(device: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"process_rss_bytes": psutil.Process().memory_info().rss}
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        info.update(
            gpu_allocated_bytes=torch.cuda.memory_allocated(index),
            gpu_reserved_bytes=torch.cuda.memory_reserved(index),
            gpu_max_allocated_bytes=torch.cuda.max_memory_allocated(index),
            gpu_free_bytes=free,
            gpu_total_bytes=total,
        )
    return info


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


class _DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        engine = self._app.state.engine
        if engine is not None:
            engine.start_draining()
        logger.info("signal %d: draining (up to %gs), then exiting", sig, self._app.state.settings.shutdown_timeout)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        # uvicorn waits here for open requests. At --shutdown-timeout the engine aborts the ones still running, so
        # each gets a 503 envelope (uvicorn's own, later timeout would cancel them into a plain-text 500).
        engine = self._app.state.engine
        timeout = self._app.state.settings.shutdown_timeout
        abort = asyncio.get_running_loop().call_later(timeout, engine.abort) if engine is not None else None
        try:
            await super().shutdown(sockets)
        finally:
            if abort is not None:
                abort.cancel()


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        for error in exc.errors():
            # Name the flag the user typed (--max-queue); cross-field checks have no field, so no prefix.
            name = _param_of(tuple(error["loc"]))
            where = f"--{name.replace('_', '-')}: " if name else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            print(f"serverasync.py: error: {where}{message}", file=sys.stderr)  # noqa: T201
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # A backstop only: _DrainingServer.shutdown aborts requests at --shutdown-timeout, each with a 503 envelope.
        # (Never `int(t) or None`: 0.5 would become None, which waits forever.)
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,
        access_log=settings.log_level == "debug",
    )
    server = _DrainingServer(config, app)
    failed = False

    def fatal() -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    app.state.on_fatal = fatal
    # uvicorn re-raises the signal that stopped it once it is done; an orderly drain (SIGTERM, or Ctrl-C) should
    # exit 0, so the re-raised signal lands on this no-op handler instead of the default one that kills the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failed:
        error = app.state.load_error
        print(f"serverasync.py: {error}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
