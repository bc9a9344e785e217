"""Model loading and engine construction, run by the app's lifespan in the background."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from api.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["ModelGeometry", "default_concurrency", "default_guidance_scale", "load_model", "usable_cores"]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_concurrency(device_type: str) -> int:
    # Two slots on either: on a GPU one request's text encoding / VAE decode overlaps another's denoising; on a CPU
    # the two split the cores (Engine.cpu_threads), so one request's Python work overlaps the other's compute and
    # no OpenMP barrier waits on a thread preempted by HTTP or PNG work. Measured in bench/RESULTS.md.
    return 2 if device_type != "cpu" else min(2, usable_cores())


@dataclass(frozen=True)
class ModelGeometry:
    """The image sizes a loaded model can generate."""

    size_multiple: int  # width and height must be multiples of this (VAE scale x transformer patch)
    default_size: int  # the side used when a request names none
    max_size: int | None  # the side its positional embedding allows (beyond it the pipeline raises a 500)

    @classmethod
    def of(cls, pipeline: Any) -> ModelGeometry:
        scale = int(getattr(pipeline, "vae_scale_factor", 8))
        multiple = scale * int(getattr(pipeline, "patch_size", None) or pipeline.transformer.config.patch_size)
        default = int(getattr(pipeline, "default_sample_size", 128)) * scale
        transformer_config = getattr(getattr(pipeline, "transformer", None), "config", None)
        pos_max = getattr(transformer_config, "pos_embed_max_size", None)
        return cls(multiple, default, int(pos_max) * multiple if pos_max else None)


def default_guidance_scale(pipeline: Any) -> float | None:
    """The guidance scale the pipeline uses when a call names none: its ``__call__``'s default (SD3's is 7.0).
    Read from the pipeline, so the value an answer reports is the one that was used, whatever the pipeline."""
    parameter = inspect.signature(type(pipeline).__call__).parameters.get("guidance_scale")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return float(parameter.default)


async def load_model(app: FastAPI, settings: Settings, loader: Callable[[Settings], Any] | None) -> None:
    """Load the model off the event loop, then build the engine and publish both on ``app.state``."""
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
    concurrency = settings.max_concurrency or default_concurrency(device.type)
    engine = Engine(
        pipeline_runner(scoped, device),
        concurrency,
        settings.max_queue,
        settings.request_timeout,
        cpu_threads=usable_cores() if device.type == "cpu" else None,
    )
    app.state.loaded = loaded
    app.state.scoped = scoped
    app.state.geometry = ModelGeometry.of(pipeline)
    app.state.default_guidance = default_guidance_scale(pipeline)
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
    """Run ``fn`` in a daemon thread that ends with it.

    Loading runs torch, and a live thread that once ran torch keeps an OpenMP thread team. With more OpenMP threads
    alive than cores, libgomp stops spin-waiting between the many small ops of a step, and every CPU generation ran
    ~1.5x slower (bench/RESULTS.md); ``asyncio.to_thread``'s pooled threads would live on. A daemon thread, because
    a SIGTERM during a load must not wait for it: the interpreter exits without joining daemon threads (a pool's
    worker would be joined, and a big model takes minutes to load).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the load was cancelled by a shutdown
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(), None)
        except BaseException as exc:  # handed to the awaiting coroutine, which decides
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped while we loaded
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="load", daemon=True).start()
    return await future


def _start(loader: Any) -> Any:
    return loader.start() if hasattr(loader, "start") and getattr(loader, "pipeline", None) is None else loader
