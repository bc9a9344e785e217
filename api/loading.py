"""Model loading and engine construction, run by the app's lifespan in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from api.limits import max_side
from api.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "ModelGeometry",
    "build_engine",
    "compile_blocks",
    "default_concurrency",
    "default_engine",
    "default_loader",
    "engine_kind",
    "engine_limits",
    "idle_release",
    "load_model",
    "usable_cores",
]


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by ``OMP_NUM_THREADS`` when that is set.

    The cap matters where several servers share a machine: Ray sets ``OMP_NUM_THREADS`` to a replica's ``num_cpus``,
    and two replicas each splitting every core between their slots would run twice as many threads as cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return cores


def default_engine(device_type: str) -> str:
    """The engine the bench found better on this device type (bench/RESULTS.md, docs/design/engines.md)."""
    return "threads"


def engine_kind(settings: Settings, device_type: str) -> str:
    """The engine that will serve: --engine, else step with --compile (it needs one), else the device's default."""
    return settings.engine or ("step" if settings.compile else default_engine(device_type))


def default_concurrency(device_type: str, engine: str = "threads") -> int:
    if engine == "step":
        # A step slot mostly waits on the shared loop: many slots cost little and let many requests share a pass.
        return 16
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


def default_loader(settings: Settings) -> Any:
    """The loader of the model ``settings`` name, loaded with their options (one ``LoadOptions`` per load)."""
    from Pipelines import ModelPipelineInitializer

    initializer = ModelPipelineInitializer(
        settings.model_source,
        settings.type_models,
        device=settings.device,
        dtype=settings.dtype,
        options=settings.load_options,
    )
    return initializer.initialize_pipeline()


async def load_model(app: FastAPI, settings: Settings, loader: Callable[[Settings], Any] | None) -> None:
    """Load the model off the event loop, then build the engine and publish both on ``app.state``."""
    if settings.several_models:
        from api.several import load_models

        await load_models(app, settings, loader)
        return

    def load_and_build() -> tuple[Any, Any, Any, Any]:
        loaded = _start((loader or default_loader)(settings))
        return (loaded, *build_engine(settings, loaded.pipeline, loaded.device))

    started = time.monotonic()
    try:
        loaded, engine, scoped, cache = await _in_passing_thread(load_and_build)
    except Exception as exc:
        app.state.load_error = exc
        logger.error("model failed to load: %s", exc)
        if app.state.on_fatal is not None:
            app.state.on_fatal()
        return
    app.state.loaded = loaded
    app.state.scoped = scoped
    app.state.prompt_cache = cache
    view = model_view(settings.model_name, loaded, engine.adapters, engine.memory)
    app.state.models.views[view.name] = view
    app.state.geometry = view.geometry
    app.state.default_guidance = view.default_guidance
    engine.listeners.append(app.state.metrics.observe_generation)
    app.state.engine = engine
    engine.set_ready()
    logger.info(
        "model %s ready on %s in %.1fs (engine=%s, max_concurrency=%d, max_queue=%d)",
        settings.model_source,
        loaded.device,
        time.monotonic() - started,
        engine.kind,
        engine.max_concurrency,
        settings.max_queue,
    )


def model_view(name: str, loaded: Any, adapters: Any, memory: Any) -> Any:
    """What the routes need of a loaded model (api.models.ModelView)."""
    from api.models import ModelView
    from utils.requestscopedpipeline import default_guidance_scale

    pipeline = loaded.pipeline
    geometry = ModelGeometry.of(pipeline)
    return ModelView(name, geometry, default_guidance_scale(pipeline), loaded, adapters, memory)


def pixel_budget(settings: Settings, geometry: ModelGeometry) -> int:
    """--max-pixels-in-flight, or by default the cost of one largest request: any request fits, and two of the
    largest never run at once."""
    return settings.max_pixels_in_flight or max_side(settings, geometry) ** 2 * settings.max_images_per_request


def compile_blocks(transformer: Any) -> None:
    """Regional compilation: each repeated transformer block is compiled (``torch.compile``, dynamic shapes, as the
    batch size changes from pass to pass), which takes a fraction of compiling the whole model. Safe with the step
    engine only: its denoising worker is the transformer's one caller."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(dynamic=True)
        return
    # SD3's transformer (diffusers 0.42) names no repeated blocks: its joint blocks are the repeated part.
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        raise ValueError(f"--compile: {type(transformer).__name__} has no repeated blocks to compile")
    for block in blocks:
        block.compile(dynamic=True)


def idle_release() -> None:
    """What the engine hands back when it falls idle (``Engine(release=...)``): the device's cached blocks
    (``engine.memory.release_memory``) and the heap's free pages (``models.quantize.trim_heap``, without its full
    collection: ~0.2 s holding the GIL with a pipeline loaded).

    Why the heap: glibc's allocator gives each thread that allocates its own arena (up to 8 per core) and keeps what
    a request frees there for later allocations. The step engine's slot, loop and encoder threads kept more with
    every block of a soak; after 2,000 mixed requests on random:tiny a trim gave back 52 MiB, in 9 ms
    (bench/soak_memory.py; bench/RESULTS.md, "Memory soak")."""
    from engine.memory import release_memory
    from models.quantize import trim_heap

    release_memory()
    trim_heap(collect=False)


def build_engine(settings: Settings, pipeline: Any, device: Any) -> tuple[Any, Any, Any]:
    """The engine the settings ask for (or the device's default), its RequestScopedPipeline and prompt cache."""
    from engine import Engine

    kind = engine_kind(settings, device.type)
    served, scoped, cache = build_served(settings, pipeline, device, kind)
    engine = Engine(
        served.runner,
        previewer=served.previewer,
        adapters=served.adapters,
        memory=served.memory,
        **engine_limits(settings, device, kind, ModelGeometry.of(pipeline)),
    )
    return engine, scoped, cache


def engine_limits(settings: Settings, device: Any, kind: str, geometry: ModelGeometry) -> dict[str, Any]:
    """The ``Engine`` arguments every server shares, of one model or several: its slots, queue, deadline, CPU
    threads, progress log, pixel budget, and what it hands back when it falls idle."""
    return {
        "max_concurrency": settings.max_concurrency or default_concurrency(device.type, kind),
        "max_queue": settings.max_queue,
        "request_timeout": settings.request_timeout,
        "cpu_threads": usable_cores() if device.type == "cpu" else None,
        "kind": kind,
        "log_interval": settings.progress_log_interval,
        "max_pixels": pixel_budget(settings, geometry),
        "release": idle_release,
    }


def build_served(
    settings: Settings, pipeline: Any, device: Any, kind: str, model: str | None = None, weights: Any = None
) -> tuple[Any, Any, Any]:
    """One model as the engine runs it (``engine.served.Served``: its runner of ``kind``, LoRA pool, previewer and
    memory admission), its RequestScopedPipeline and prompt cache. ``model``: its name among several (None: the one
    model); ``weights``: what the resident models hold, taken from a fixed --memory-budget (several models)."""
    from engine.previews import LatentPreviewer
    from engine.prompt_cache import PromptCache
    from engine.served import Served
    from engine.step import StepRunner
    from engine.threads import pipeline_runner
    from utils import RequestScopedPipeline

    adapters = adapter_pool(settings, pipeline, model)
    scoped = RequestScopedPipeline(pipeline)
    cache = PromptCache(settings.prompt_cache_size, identity=cache_identity(settings, pipeline, model))
    cores = usable_cores() if device.type == "cpu" else None
    if kind == "step":
        if settings.compile:
            compile_blocks(pipeline.transformer)
        # A compiled module must have one caller: one loop then (the calibration measures no other count).
        loops = 1 if settings.compile else settings.step_loops
        runner: Any = StepRunner(
            scoped,
            device,
            settings.max_batch_size,
            cache,
            cpu_threads=cores,
            loops=loops,
            adapters=adapters,
            tiles=settings.tiles,
        )
    else:
        runner = pipeline_runner(scoped, device, cache, adapters, tiles=settings.tiles)
    previewer = LatentPreviewer(pipeline.vae, pipeline.vae_scale_factor)
    previewer.fit()  # at load, so that no request waits for it (bench/RESULTS.md: its cost)
    memory = memory_admission(settings, pipeline, device, weights)
    return Served(runner, previewer, adapters, memory, name=model or ""), scoped, cache


def memory_admission(settings: Settings, pipeline: Any, device: Any, weights: Any = None) -> Any:
    """Admission by measured memory (engine.memory_admission), its costs measured on the loaded model now; None when
    turned off (--memory-admission off) or when the measurement failed (the pixel budget and the slots still hold)."""
    if settings.memory_admission == "off":
        return None
    from engine.memory_admission import MemoryAdmission, measure_costs
    from engine.memory_meter import MemoryMeter

    geometry = ModelGeometry.of(pipeline)
    tile = getattr(pipeline.vae, "tile_sample_min_size", 0)
    tile = tile[0] * tile[1] if isinstance(tile, (tuple, list)) else int(tile or 0) ** 2
    admission = MemoryAdmission(
        MemoryMeter(device),
        reserve=settings.memory_reserve,
        budget=budget_bytes(settings.memory_budget, device),
        weights=weights,
        max_wait=settings.memory_wait or settings.request_timeout,
        tiles=settings.tiles,
        tile_pixels=tile,
        size_multiple=geometry.size_multiple,
        max_side=max_side(settings, geometry),
    )
    try:
        measure_costs(admission, pipeline, device)
    except Exception as exc:  # noqa: BLE001 - without a measurement the server still runs, on its other limits
        logger.warning("memory per request could not be measured (%s): admission by slots and pixels only", exc)
        return None
    return admission


def budget_bytes(text: str, device: Any) -> int:
    """--memory-budget in bytes (a fraction is of the device's memory; 0: none given)."""
    from registry.memory import device_total, parse_memory

    if text.strip() in ("", "0"):
        return 0
    return parse_memory(text, device_total(device) if any(c in text for c in ".%") else 0)


def cache_identity(settings: Settings, pipeline: Any, model: str | None = None) -> tuple[Any, ...]:
    """What produced a cached embedding besides its text: the model, the encoders' dtype and device, whether T5 is
    loaded and how the encoders are quantized (a server cannot change them while it runs; the key still says them)."""
    from engine.prompt_cache import encoders_device

    dtype = getattr(getattr(pipeline, "text_encoder", None), "dtype", None)
    options = settings.load_options
    quantized = tuple(sorted((c, k) for c, k in options.quantize.items() if c != "transformer"))
    t5 = getattr(pipeline, "text_encoder_3", None) is not None
    identity = (model or settings.model_source, str(dtype), str(encoders_device(pipeline)))
    return (*identity, ("t5", t5), ("quantized", quantized))


def adapter_pool(settings: Settings, pipeline: Any, model: str | None = None) -> Any:
    """The LoRA pool the settings give ``model`` (None: the default model's; the result None: no adapters); its
    --lora ones are loaded now."""
    from api.adapters import parse_lora_options

    model = model or settings.default_model
    entries = settings.loras_by_model().get(model, [])
    directory = settings.lora_dirs().get(model)
    if not entries and directory is None:
        return None
    from engine.adapters import AdapterPool

    return AdapterPool(pipeline, parse_lora_options(entries), directory, settings.max_loras)


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
