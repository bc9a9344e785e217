"""Operations: the welcome document, liveness, readiness, status and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import psutil
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.edits import task_status
from api.errors import error_response
from api.limits import form_limits

__all__ = ["router"]

router = APIRouter()


@router.get("/", summary="Welcome")
async def root(request: Request) -> dict[str, Any]:
    return {
        "message": "SD3 async inference server. POST /api/diffusers/inference or /v1/images/generations.",
        "model": request.app.state.settings.model_name,
        "docs": "/docs",
        "playground": "/ui",
        "status": "/api/status",
    }


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: 200 when the model is loaded and the server accepts work")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    engine = state.engine
    if engine is not None and engine.ready_reason is None:
        return JSONResponse({"status": "ready", "model": state.settings.model_name})
    reason = (
        engine.ready_reason if engine is not None else ("load_failed" if state.load_error is not None else "loading")
    )
    return error_response(503, f"Not ready: {reason}.", "unavailable", None, reason, **{"Retry-After": "5"})


@router.get("/api/status", summary="Server status, memory and load")
async def status(request: Request) -> dict[str, Any]:
    state = request.app.state
    settings, engine, loaded = state.settings, state.engine, state.loaded
    device = str(loaded.device) if loaded is not None else (settings.device or "pending")
    return {
        "current_model": settings.model_name,
        "type_models": settings.type_models,
        "device": device,
        "ready": engine is not None and engine.ready_reason is None,
        "memory": memory_info(loaded.device if loaded is not None else None),
        "total_requests": engine.stats["total"] if engine else 0,
        "active_inferences": engine.active if engine else 0,
        "queued": engine.queued if engine else 0,
        "max_concurrency": engine.max_concurrency if engine else settings.max_concurrency,
        "max_queue": settings.max_queue,
        "pixels_running": engine.pixels_running if engine else 0,
        "max_pixels_in_flight": engine.max_pixels if engine else settings.max_pixels_in_flight,
        "limits": form_limits(settings, getattr(state, "geometry", None)),
        "tasks": task_status(loaded),
        "engine": _engine_info(engine, settings, getattr(state, "prompt_cache", None)),
        "requests": dict(engine.stats) if engine else {},
        "images_stored": len(state.store),
        "adapters": _adapter_info(engine),
        "model_load": _load_info(settings, loaded),
        "memory_admission": _memory_admission(engine),
        "models": _models_info(state),
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text (or OpenMetrics, if accepted)"}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


def _engine_info(engine: Any, settings: Any, cache: Any) -> dict[str, Any]:
    """The execution strategy, its batching figures (step engine) and the prompt cache's counters."""
    info: dict[str, Any] = {"kind": getattr(engine, "kind", None) if engine else settings.engine}
    runner_stats = getattr(getattr(engine, "runner", None), "stats", None)
    if runner_stats is not None:
        info.update(max_batch_size=settings.max_batch_size, batching=runner_stats)
    info["prompt_cache"] = cache.stats() if cache is not None else None
    return info


def _models_info(state: Any) -> dict[str, Any]:
    """Every configured model: the default, and (several models) each one's state, bytes held alone and shared,
    requests in flight, loads, evictions; the shared components; the budget and what the weights use."""
    models = state.models
    info: dict[str, Any] = {"default": models.default, "names": list(models.names)}
    if state.modelset is not None:
        info.update(state.modelset.status())
    return info


def _memory_admission(engine: Any) -> dict[str, Any] | None:
    """The measured-memory estimate and budget, and what the running requests hold (None: not admitting by it)."""
    memory = getattr(engine, "memory", None)
    if memory is None:
        return None
    return {**memory.status(), "held_bytes": engine.memory_held}


def _load_info(settings: Any, loaded: Any) -> dict[str, Any]:
    """How the model was loaded: quantized components, T5 on or off, the text encoders' device, tiled decoding."""
    pipeline = getattr(loaded, "pipeline", None)
    info: dict[str, Any] = settings.load_options.describe()
    if pipeline is not None:  # what the loaded pipeline holds, whatever the loader
        info["t5"] = getattr(pipeline, "text_encoder_3", None) is not None
        encoder = getattr(pipeline, "text_encoder", None)
        info["encoders_device"] = str(next(encoder.parameters()).device) if encoder is not None else None
    info.update(vae_tiling=settings.vae_tiling, vae_tiling_above=settings.vae_tiling_above)
    return info


def _adapter_info(engine: Any) -> dict[str, Any] | None:
    """The LoRA pool: available, loaded, capacity, hits, misses, switches (None: the server has no adapters)."""
    pool = getattr(engine, "adapters", None)
    return pool.stats() if pool is not None else None


def memory_info(device: Any) -> dict[str, Any]:
    """The process's RSS and, on CUDA, the device's allocator figures."""
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
