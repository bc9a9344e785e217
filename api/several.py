"""A server of several models (issue 30): the registry's ``ModelSet`` behind one engine.

- The set loads each model on its loader thread (``registry.models``), sharing identical components between models,
  and builds its bundle there too (``build``): the model's runner, LoRA pool, previewer and memory admission
  (``api.loading.build_served``, as a server of one model builds them), its prompt cache (keyed by the model) and
  what the routes need of it (``api.models.ModelView``). An unloaded model's bundle is closed (its threads end).
- One engine runs every model's requests (``engine.served``): its ``ModelSource`` here holds a request's model
  resident while the request runs (``ModelSet.acquire`` / ``release``), tells a waiting request's progress that its
  model is loading, and turns the registry's refusals into the engine's ``ModelUnavailable``.
- ``--memory-budget`` is one budget: the set keeps the resident models' weights in it, and a fixed budget's
  requests get what the weights leave (``MemoryAdmission.weights``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from api.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["Bundle", "RegistrySource", "load_models"]


@dataclass
class Bundle:
    """One loaded model as this server serves it (the set's ``served``, opaque to the registry)."""

    served: Any  # engine.served.Served
    view: Any  # api.models.ModelView
    scoped: Any
    prompt_cache: Any

    def close(self) -> None:
        self.served.close()


class RegistrySource:
    """The engine's ``ModelSource`` over a ``ModelSet`` (see the module's docstring)."""

    def __init__(self, models: Any, views: Any) -> None:
        self.set = models
        self.views = views  # api.models.ServerModels: a model's view is kept once it has loaded
        self.states: dict[str, str] = {}  # each model's last state, told by the set on the event loop
        models.on_state(self._state)

    def _state(self, name: str, state: str) -> None:
        self.states[name] = state

    @contextlib.asynccontextmanager
    async def hold(self, name: str, wait: Callable[[Any], Any], progress: Any) -> AsyncIterator[Any]:
        from engine import ModelUnavailable, ProgressEvent
        from registry.models import ModelLoadFailed, ModelTooLarge

        if progress is not None and self.states.get(name) != "resident":
            progress(ProgressEvent("loading", model=name))
        acquiring = asyncio.ensure_future(self.set.acquire(name))
        try:
            resident = await wait(acquiring)
        except ModelTooLarge as exc:
            raise ModelUnavailable(name, "too_large", str(exc)) from None
        except ModelLoadFailed as exc:
            raise ModelUnavailable(name, "load_failed", f"model {name!r} failed to load") from exc
        except BaseException:
            self._give_up(acquiring)
            raise
        self.views.views.setdefault(name, resident.served.view)
        try:
            yield resident.served.served
        finally:
            self.set.release(resident)

    def _give_up(self, acquiring: asyncio.Future[Any]) -> None:
        """The request stopped waiting for its model: stop its acquire, or release what it got meanwhile."""

        def settle(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.set.release(done.result())

        if not acquiring.done():
            acquiring.cancel()
        acquiring.add_done_callback(settle)


def _budgets(settings: Settings, device: Any) -> tuple[int, int]:
    """(budget, cpu budget) in bytes: --memory-budget (default: the device's memory less --memory-reserve) and
    --cpu-memory-budget (a fraction is of the machine's memory)."""
    import torch

    from api.loading import budget_bytes
    from registry.memory import device_total, parse_memory

    budget = budget_bytes(settings.memory_budget, device)
    if not budget:
        budget = max(0, device_total(device) - settings.memory_reserve)
    cpu = settings.cpu_memory_budget
    cpu_budget = 0 if cpu == "0" else parse_memory(cpu, device_total(torch.device("cpu")))
    return budget, cpu_budget


def make_model_set(
    settings: Settings,
    loader: Callable[[Settings], Any] | None,
    device: Any,
    kind: str,
    live: dict[str, Bundle] | None = None,
) -> Any:
    """The ``ModelSet`` of the settings' models, building each one's ``Bundle`` on its loader thread; ``live`` is
    kept to the bundles built and not closed yet, by model (``api.metrics`` reads their runners and caches)."""
    from api.loading import _start, build_served, model_view
    from Pipelines import resolve_dtype
    from registry.models import ModelSet

    budget, cpu_budget = _budgets(settings, device)
    fixed = settings.memory_budget != "0"
    holder: dict[str, Any] = {}
    live = {} if live is None else live

    def weights() -> int:  # what the resident models hold of a fixed budget (read on the event loop)
        return int(holder["set"].status()["used"]) if "set" in holder else 0

    def build(spec: Any, loaded: Any) -> Bundle:
        served, scoped, cache = build_served(
            settings, loaded.pipeline, loaded.device, kind, spec.name, weights if fixed else None
        )
        view = model_view(spec.name, loaded, served.adapters, served.memory)
        bundle = live[spec.name] = Bundle(served, view, scoped, cache)
        return bundle

    def close(bundle: Bundle) -> None:
        if live.get(bundle.view.name) is bundle:
            del live[bundle.view.name]
        bundle.close()

    load = None
    if loader is not None:  # a custom loader (tests, embedders) takes settings naming the one model it loads

        def load(spec: Any) -> Any:
            return _start(loader(settings.model_copy(update={"model": [spec.source], "models_file": None})))

    models = ModelSet(
        settings.model_specs,
        load,
        budget=budget,
        cpu_budget=cpu_budget,
        device=device,
        dtype=resolve_dtype(settings.dtype, device),
        options=settings.load_options,
        build=build,
        close=close,
        digests_dir=settings.data_dir,
    )
    holder["set"] = models
    return models


async def load_models(app: FastAPI, settings: Settings, loader: Callable[[Settings], Any] | None) -> None:
    """Start the set (refusing models that can never fit, loading the default and the preloaded ones), then build
    the one engine over it and publish both on ``app.state``."""
    from api.loading import engine_kind, engine_limits
    from engine import Engine
    from Pipelines import resolve_device

    started = time.monotonic()
    device = resolve_device(settings.device)
    kind = engine_kind(settings, device.type)
    try:
        models = make_model_set(settings, loader, device, kind, app.state.bundles)
        views = app.state.models
        source = RegistrySource(models, views)
        views.attach(models)
        app.state.modelset = models
        await models.start()
        resident = await models.acquire(models.default)
        bundle = resident.served
        models.release(resident)
    except Exception as exc:
        app.state.load_error = exc
        logger.error("models failed to load: %s", exc)
        if app.state.on_fatal is not None:
            app.state.on_fatal()
        return
    view = views.views.setdefault(models.default, bundle.view)
    engine = Engine(
        None,  # type: ignore[arg-type] - each request's runner comes from its model (the source)
        models=source,
        **engine_limits(settings, device, kind, view.geometry),
    )
    app.state.loaded, app.state.scoped, app.state.prompt_cache = view.loaded, bundle.scoped, bundle.prompt_cache
    app.state.geometry, app.state.default_guidance = view.geometry, view.default_guidance
    engine.listeners.append(app.state.metrics.observe_generation)
    app.state.engine = engine
    engine.set_ready()
    logger.info(
        "%d models (%s; default %s) on %s, ready in %.1fs (engine=%s, max_concurrency=%d, max_queue=%d)",
        len(models.names),
        ", ".join(models.names),
        models.default,
        device,
        time.monotonic() - started,
        engine.kind,
        engine.max_concurrency,
        settings.max_queue,
    )
