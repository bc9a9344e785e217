"""``create_app(settings, loader)``: the FastAPI app, its lifespan (background model loading, drain) and middleware."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from api.docs_headers import DocsHeadersMiddleware
from api.errors import ERROR_RESPONSES, install_error_handlers
from api.generation import job_failure
from api.loading import load_model
from api.metrics import Metrics, MetricsMiddleware
from api.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HeadAsGetMiddleware,
    RequestIdMiddleware,
    StopOnShutdownMiddleware,
)
from api.models import server_models
from api.openapi import publish_limits
from api.routes import ROUTERS, UPLOAD_PATHS
from api.settings import Settings
from jobs import make_job_store

logger = logging.getLogger(__name__)

__all__ = ["create_app", "stop_requests"]


def create_app(settings: Settings | None = None, loader: Callable[[Settings], Any] | None = None) -> FastAPI:
    """Build the app. ``loader(settings)`` returns a started loader with ``.pipeline`` and ``.device``
    (default: ``Pipelines.ModelPipelineInitializer``); it runs in a thread when the app starts."""
    from utils.image_store import ImageStore

    settings = settings or Settings()
    store = ImageStore(
        settings.image_dir,
        ttl_seconds=settings.image_ttl,
        max_files=settings.image_max_files,
        max_bytes=settings.image_max_bytes,
        grace_seconds=settings.image_grace,
    )

    lifespan = _lifespan(settings, loader, store)

    # /docs with Swagger UI's script and CSS served from the fastapi-offline package, so it works with no network;
    # no /redoc (one set of docs). No redirects to the slash-less path: a 307 is outside the error envelope, built
    # from the Host header, and makes a client send its body twice; "/api/jobs/" is a 404 like any unknown path.
    app = FastAPIOffline(
        title="SD3 async inference server",
        version="1.0.0",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        redoc_url=None,
        static_url="/docs/static",
        redirect_slashes=False,
    )
    # The collaborators every route reads (api.deps); engine and loaded are set once the model has loaded.
    app.state.settings = settings
    app.state.started_at = time.time()  # unix seconds: GET /v1/models' created
    app.state.store = store
    failure_of = job_failure(settings.request_timeout)
    app.state.jobs = make_job_store(settings, _finisher_for(store), lambda: app.state.engine, failure_of)
    app.state.models = server_models(settings)  # the configured models' names; each one's view once it loads
    app.state.modelset = None  # several models: the registry's ModelSet (api.several)
    app.state.bundles = {}  # several models: each resident model's runner, caches (api.several.Bundle), by name
    app.state.engine = None
    app.state.loaded = None
    app.state.prompt_cache = None
    app.state.load_error = None
    app.state.on_fatal = None
    app.state.requests_stopped = asyncio.Event()
    app.state.metrics = Metrics(app.state)

    install_error_handlers(app)
    _add_middleware(app, settings)
    for router in ROUTERS:
        app.include_router(router)
    publish_limits(app, settings)
    return app


def _lifespan(
    settings: Settings, loader: Callable[[Settings], Any] | None, store: Any
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: load the model in the background and prune images while serving; on the way out, drain
    the engine, then the jobs, then close the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.load_task = asyncio.create_task(load_model(app, settings, loader))
        state.prune_task = asyncio.create_task(_prune_periodically(store, settings))
        state.jobs.open()
        try:
            yield
        finally:
            engine = state.engine
            if engine is not None:
                finished = await engine.drain(settings.shutdown_timeout)
                if not finished:
                    logger.warning("shutdown timeout: %d request(s) still running were abandoned", engine.active)
            # The engine has drained (or aborted): the jobs' tasks are storing their last images or already done.
            await state.jobs.close(settings.shutdown_timeout)
            if engine is not None:
                engine.close()
            if state.modelset is not None:
                await state.modelset.stop()  # every model's runner and adapters closed
            for task in (state.load_task, state.prune_task):
                task.cancel()

    return lifespan


def _finisher_for(store: Any) -> Callable[[dict[str, Any]], Any]:
    """What builds a job's answer from its record's context (a durable store runs jobs made by any server). Its image
    URLs are paths: each reader gets them under its own base (api/routes/jobs.py)."""

    def finisher(context: dict[str, Any]) -> Any:
        from api.routes.native import native_answer
        from utils.image_store import Encoding

        encoding = Encoding(context["format"], context["compression"])
        return functools.partial(native_answer, store, "", encoding=encoding)

    return finisher


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    # The last added runs first. The key check sits inside CORS, so preflights (which carry no credentials) are
    # answered and refusals get CORS headers; it runs before any route reads a body.
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, open_metrics=not settings.metrics_auth)
    origins = settings.cors_origin_list
    if origins:
        # Credentials are only allowed with an explicit origin list: '*' with cookies would let any site act as
        # the user.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials="*" not in origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],  # DELETE: cancelling a job
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Seed", "Server-Timing", "Retry-After", "Location"],
        )
    app.add_middleware(DocsHeadersMiddleware)  # /docs gets /ui's framing, sniffing and script rules
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_body_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(StopOnShutdownMiddleware, stopped=app.state.requests_stopped)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outside the others: it counts their refusals
    app.add_middleware(RequestIdMiddleware)


def stop_requests(app: FastAPI) -> None:
    """End a drain now: every open request is answered 503 ``draining`` (the engine's own, then the rest).
    Call from the event loop."""
    if app.state.engine is not None:
        app.state.engine.abort()
    app.state.requests_stopped.set()


async def _prune_periodically(store: Any, settings: Settings) -> None:
    # Saves prune too; this catches images that expire, or leave their grace period over a cap, while nobody saves.
    periods = [settings.image_ttl] if settings.image_ttl > 0 else []
    if settings.image_max_files or settings.image_max_bytes:
        periods.append(settings.image_grace)
    if not periods:
        return
    while True:
        await asyncio.sleep(min(60.0, max(1.0, min(periods) / 4)))
        await asyncio.to_thread(store.prune)
