"""``ModelSet``: several named models in one memory budget, loaded on demand on one loader thread.

A request ``acquire``s its model (counted in flight: a model is never evicted while a request uses it) and
``release``s it. A model that is not resident is loaded on the loader thread (``registry.thread``), one load at a
time; a request for a model being loaded waits for that same load, requests for resident models keep running. To
make room, the least recently used idle, unpinned models are evicted (the default like any other) until the new
one's estimate fits the budget beside what stays, each shared component counted once (``registry.residency``). On a
GPU an evicted model moves to the CPU tier while ``cpu_budget`` allows (coming back is a ``.to(device)``), else it is
dropped; a component stays on the device while a resident model uses it. A load that cannot find room (the others
are in flight or pinned) waits for a release, for as long as some request still waits for it.

Bytes are estimated before a load (``registry.loader.plan_model``: file headers times the dtype's size) and measured
after it (``nbytes`` of the loaded components). ``load(spec) -> loaded`` (``.pipeline``, ``.device``) and
``build(spec, loaded) -> served`` (the server's bundle, opaque here) run on the loader thread; so does
``close(served)`` when a model is unloaded. ``on_state(name, state)`` listeners are called on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .components import ComponentCache, FileDigests, Part
from .records import STATES, ModelLoadFailed, ModelsRefused, ModelTooLarge, Resident, _Abandoned, _Job, _Model
from .residency import choose_victims, cpu_overflow, device_bytes, device_keys
from .specs import ModelSpec
from .thread import LoaderThread

logger = logging.getLogger(__name__)

__all__ = ["STATES", "ModelLoadFailed", "ModelSet", "ModelTooLarge", "ModelsRefused", "Resident"]


class ModelSet:
    """See the module's docstring. ``device`` and ``dtype`` are the loads' (``dtype`` None: the device's default);
    ``options`` a ``models.options.LoadOptions`` for every model; ``digests_dir`` keeps the weight files' digests
    across restarts; ``estimate(spec) -> list[Part]`` replaces the default estimate (a custom ``load``'s)."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        load: Callable[[ModelSpec], Any] | None = None,
        *,
        budget: int,
        cpu_budget: int = 0,
        device: Any = "cpu",
        dtype: Any = None,
        options: Any = None,
        build: Callable[[ModelSpec, Any], Any] | None = None,
        close: Callable[[Any], None] | None = None,
        digests_dir: str | None = None,
        estimate: Callable[[ModelSpec], list[Part]] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("a ModelSet needs at least one model")
        self.specs = list(specs)
        self.budget, self.cpu_budget = int(budget), int(cpu_budget)
        self.device, self._dtype, self.options = device, dtype, options
        self._load_fn, self._build, self._close, self._estimate_fn = load, build, close, estimate
        self.cache = ComponentCache()
        self.digests = FileDigests(digests_dir)
        self.listeners: list[Callable[[str, str], None]] = []
        # Protects every _Model's fields (state, in_flight, job, parts, ...): the event loop acquires and releases
        # while the loader thread loads and evicts. A Condition: a load waiting for room waits for a release.
        self._cond = threading.Condition()
        self._models = {spec.name: _Model(spec) for spec in self.specs}
        self._thread = LoaderThread()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # -- names -------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def default(self) -> str:
        return next((s.name for s in self.specs if s.default), self.specs[0].name)

    def resolve(self, name: str | None) -> str | None:
        """``name`` if it is a configured model, else None (the caller decides: the default, or a 404)."""
        return name if name is not None and name in self._models else None

    def on_state(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(name, state)`` (on the event loop) whenever a model changes state."""
        self.listeners.append(listener)

    # -- the device ----------------------------------------------------------------------------------------------
    @property
    def _device(self) -> Any:
        import torch

        return torch.device(self.device)

    @property
    def dtype(self) -> Any:
        from Pipelines import resolve_dtype

        return resolve_dtype(self._dtype, self._device)

    @property
    def tiered(self) -> bool:
        """Whether evicted models may wait in CPU memory: on a GPU with a CPU budget."""
        return self._device.type != "cpu" and self.cpu_budget > 0

    # -- requests ------------------------------------------------------------------------------------------------
    async def acquire(self, name: str, timeout: float | None = None) -> Resident:
        """The model ``name``, loaded, counted in flight until ``release``. See the module's docstring."""
        model = self._models[name]  # KeyError: ``resolve`` first
        self._loop = asyncio.get_running_loop()
        with self._cond:
            model.in_flight += 1
            model.last_used = time.monotonic()
            if model.state == "resident":
                return Resident(model.spec, model.loaded, model.served)
            job = model.job or self._queue_load(model)
            job.waiters += 1
        try:
            await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except BaseException:
            with self._cond:
                model.in_flight -= 1
                job.waiters -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            job.waiters -= 1
            return Resident(model.spec, model.loaded, model.served)

    def release(self, resident: Resident) -> None:
        """The request is done with its model (safe from any thread; a second release of the same one is a no-op)."""
        model = self._models[resident.spec.name]
        with self._cond:
            if resident._released:
                return
            resident._released = True
            model.in_flight -= 1
            model.last_used = time.monotonic()
            self._cond.notify_all()

    async def unload(self, name: str) -> bool:
        """Unload ``name`` now if it is resident, idle and unpinned (to the CPU tier where there is one, as an
        eviction); True if it was. A model in flight, pinned or loading stays: the budget decides later, as for any
        other. For a caller that knows the model will not be asked for here soon (Ray Serve's multiplexing sends its
        requests to other replicas: deploy/multiplex.py)."""
        model = self._models[name]  # KeyError: ``resolve`` first
        self._loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(self._thread.submit(lambda: self._unload_idle(model)))

    def _unload_idle(self, model: _Model) -> bool:
        """(Loader thread.) See ``unload``."""
        with self._cond:
            if model.state != "resident" or model.in_flight or model.job is not None or model.spec.pinned:
                return False
            model.evictions += 1
            state = "cpu" if self.tiered else "unloaded"
            self._set_state(model, state)
            keep = device_keys({m.spec.name: m.parts for m in self._models.values() if m.state == "resident"})
        self._evict(model, state, keep)
        return True

    def _queue_load(self, model: _Model) -> _Job:
        """(Under the lock.) A load of ``model`` queued on the loader thread, awaited through the job's future."""
        assert self._loop is not None
        job = _Job(asyncio.wrap_future(self._thread.submit(lambda: self._run_load(model, job)), loop=self._loop))
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # abandoned: nobody retrieves it
        model.job = job
        return job

    # -- start and stop ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Refuse the models that can never fit alone (``ModelsRefused``, listing them), then load the default and
        the preload ones, in order."""
        self._loop = asyncio.get_running_loop()
        alone = await asyncio.wrap_future(self._thread.submit(self._sizes))
        refused = [ModelTooLarge(name, need, self.budget) for name, need in alone.items() if need > self.budget]
        if refused:
            raise ModelsRefused(refused)
        order = [self.default] + [s.name for s in self.specs if s.preload and s.name != self.default]
        for name in order:
            self.release(await self.acquire(name))

    def _sizes(self) -> dict[str, int]:
        """(Loader thread.) Each model's estimated bytes on the device, alone."""
        return {spec.name: device_bytes({spec.name: self._plan(spec, keys=False)}) for spec in self.specs}

    async def stop(self) -> None:
        """Unload every model (``close`` each served bundle); requests still in flight keep what they hold."""
        self._stopping = True
        await asyncio.wrap_future(self._thread.submit(self._drop_all))

    def _drop_all(self) -> None:
        with self._cond:
            loaded = [m for m in self._models.values() if m.loaded is not None]
            for model in loaded:
                self._set_state(model, "unloaded")
        for model in loaded:
            self._drop(model)
        self._free()

    # -- the loader thread ---------------------------------------------------------------------------------------
    def _plan(self, spec: ModelSpec, keys: bool = True) -> list[Part]:
        if self._estimate_fn is not None:
            return self._estimate_fn(spec)
        from models.options import LoadOptions

        from .loader import plan_model

        digests = self.digests if keys else None
        return plan_model(spec, self.options or LoadOptions(), self._device, self.dtype, digests)

    def _load(self, spec: ModelSpec) -> Any:
        if self._load_fn is not None:
            return self._load_fn(spec)
        from models.options import LoadOptions

        from .loader import load_model

        return load_model(spec, self.options or LoadOptions(), self._device, self.dtype, self.cache, self.digests)

    def _run_load(self, model: _Model, job: _Job) -> Resident:
        """(Loader thread.) Make room, then load ``model`` (or bring it back from the CPU tier)."""
        try:
            needs = model.parts if model.loaded is not None else self._estimated(model)
            alone = device_bytes({model.spec.name: needs})
            if alone > self.budget:
                raise ModelTooLarge(model.spec.name, alone, self.budget)
            evictions = self._make_room(model, needs, job)
        except BaseException:
            with self._cond:
                model.job = None
            raise
        for victim, state in evictions:
            self._evict(victim, state, keep=device_keys({model.spec.name: needs}))
        try:
            self._bring_in(model)
        except BaseException as exc:
            with self._cond:
                model.job = None
                self._set_state(model, "unloaded")
            self._drop(model)
            if isinstance(exc, Exception):
                raise ModelLoadFailed(model.spec.name, exc) from exc
            raise
        return Resident(model.spec, model.loaded, model.served)

    def _estimated(self, model: _Model) -> list[Part]:
        if model.estimate is None:
            model.estimate = self._plan(model.spec)
        return model.estimate

    def _make_room(self, model: _Model, needs: list[Part], job: _Job) -> list[tuple[_Model, str]]:
        """(Loader thread.) Wait until evicting idle models makes ``needs`` fit; mark them and ``model`` (loading)."""
        with self._cond:
            while True:
                if job.waiters == 0 or self._stopping:
                    model.job = None  # under the lock: a request from now on queues a load of its own
                    raise _Abandoned(model.spec.name)
                plan = self._room_plan(model, needs)
                if plan is not None:
                    break
                self._cond.wait(0.5)
            for victim, state in plan:
                if victim.state == "resident":
                    victim.evictions += 1
                self._set_state(victim, state)
            self._set_state(model, "loading")
            return plan

    def _room_plan(self, model: _Model, needs: list[Part]) -> list[tuple[_Model, str]] | None:
        """(Under the lock.) The evictions that let ``model`` in now, each with the state it goes to; None: none."""
        others = [m for m in self._models.values() if m is not model]
        resident = {m.spec.name: m.parts for m in others if m.state == "resident"}
        idle = sorted(
            (m for m in others if m.state == "resident" and m.in_flight == 0 and not m.spec.pinned),
            key=lambda m: m.last_used,
        )
        victims = choose_victims((model.spec.name, needs), resident, [m.spec.name for m in idle], self.budget)
        if victims is None:
            return None
        plan = [(self._models[v], "cpu" if self.tiered else "unloaded") for v in victims]
        if not self.tiered:
            return plan
        staying = {k: v for k, v in resident.items() if k not in victims}
        staying[model.spec.name] = needs
        tier = {m.spec.name: m.parts for m in others if m.state == "cpu" or m.spec.name in victims}
        order = sorted(
            (m for m in others if m.spec.name in tier and m.in_flight == 0 and m.job is None),
            key=lambda m: m.last_used,
        )
        dropped = set(cpu_overflow(tier, device_keys(staying), [m.spec.name for m in order], self.cpu_budget))
        plan = [(m, "unloaded" if m.spec.name in dropped else state) for m, state in plan]
        return plan + [(self._models[n], "unloaded") for n in dropped if n not in victims]

    def _evict(self, model: _Model, state: str, keep: set[str]) -> None:
        """(Loader thread.) Move ``model`` to the CPU tier or drop it; what a resident model (or the one coming in,
        ``keep``) uses stays on the device."""
        logger.info("model %s evicted (%s)", model.spec.name, "to the CPU tier" if state == "cpu" else "unloaded")
        if state == "unloaded":
            self._drop(model)
        self._settle(keep)
        self._free()

    def _drop(self, model: _Model) -> None:
        served, model.loaded, model.served, model.parts = model.served, None, None, []
        self.cache.release(model.spec.name)
        if served is not None and self._close is not None:
            try:
                self._close(served)
            except Exception:  # noqa: BLE001 - a bundle that fails to close must not stop the eviction
                logger.exception("closing model %s failed", model.spec.name)

    def _settle(self, keep: set[str]) -> None:
        """(Loader thread.) Each component where it belongs: on the device while a resident model (or ``keep``)
        uses it, else in CPU memory (only the CPU tier's models hold it)."""
        if not self.tiered:
            return
        with self._cond:
            on_device = keep | device_keys(
                {m.spec.name: m.parts for m in self._models.values() if m.state in ("resident", "loading")}
            )
            parts = [p for m in self._models.values() if m.state == "cpu" for p in m.parts if p.on_device]
        for part in parts:
            if part.key not in on_device and part.module is not None:
                part.module.to("cpu")

    def _bring_in(self, model: _Model) -> None:
        """(Loader thread.) Load ``model`` (and build its bundle), or move it back from the CPU tier."""
        from .loader import parts_of

        started = time.monotonic()
        if model.loaded is not None:
            for part in model.parts:
                if part.on_device and part.module is not None:
                    part.module.to(self._device)
            loaded, served = model.loaded, model.served
        else:
            loaded = self._load(model.spec)
            with self._cond:
                model.loaded = loaded  # so that a failing build still releases what the load took
            served = self._build(model.spec, loaded) if self._build is not None else None
        parts = parts_of(model.spec.name, loaded, self.cache if self._load_fn is None else None, self._device)
        with self._cond:
            model.loaded, model.served, model.parts = loaded, served, parts
            model.loads += 1
            model.job = None
            self._set_state(model, "resident")
        logger.info("model %s resident in %.2fs", model.spec.name, time.monotonic() - started)

    def _free(self) -> None:
        import gc

        gc.collect()
        if self._device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        else:
            from models.quantize import trim_heap

            trim_heap()

    def _set_state(self, model: _Model, state: str) -> None:
        """(Under the lock.) ``model`` is now ``state``; listeners hear it on the event loop."""
        model.state = state
        loop = self._loop
        if loop is not None and self.listeners:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                loop.call_soon_threadsafe(self._tell, model.spec.name, state)

    def _tell(self, name: str, state: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(name, state)
            except Exception:  # noqa: BLE001 - a listener's failure is its own
                logger.exception("model state listener failed")

    # -- what the operator sees ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Per model: state, bytes held alone and shared, in flight, loads, evictions, last used; the shared
        components; the budget and what is used."""
        from .status import describe

        with self._cond:
            return describe(self, list(self._models.values()), self.cache.entries())
