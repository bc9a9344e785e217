"""Per-request LoRA adapters on one shared transformer: a pool of loaded adapters and a gate around every pass.

The trap: in diffusers (PEFT backend) the active adapters and their scales are state of the transformer's modules,
shared by every thread that calls it. Two requests with different adapters running at once would switch each other's
adapters between (or during) their passes. Here the transformer's ``forward`` is wrapped once (``AdapterPool.
install``) by a gate: every pass declares the adapter set it needs (the calling thread's, set by ``bound``), passes
with the same set run together, a pass with another set waits until they are done, then the modules are switched
(``set_adapters(names, scales)``, or ``disable_lora`` for none) and it runs. The gate is phase-fair: once a pass
with another set waits, new passes of the running set queue behind it, so no set starves.

- threads engine: each slot thread binds its request's set around its pipeline call, so the gate works per
  transformer pass (per denoising step): requests with the same set step side by side; requests with different
  sets take turns, step by step, and each switch costs one walk over the adapter layers.
- step engine: the loop is the transformer's only caller and batches only requests with the same set (its group
  key); it binds the group's set around the pass, so the gate only ever switches between passes.

Loading (``acquire``) reads the file off the gate, on the pool's one loader thread (diffusers/PEFT module surgery
is not thread-safe), then injects the layers while no pass runs (the gate held exclusively: one short pause of the
passes in flight). Adapters named at start-up stay loaded; those found in the adapter directory are loaded on first
use into a pool of ``capacity``, the least recently used one evicted when it is full, never one that a request in
flight holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapter_loading import ADAPTER_SUFFIX, adapter_file, quiet_load, read_adapter
from .types import EngineError

__all__ = [
    "ADAPTER_SUFFIX",
    "ERRORS",
    "AdapterGate",
    "AdapterPool",
    "AdapterPoolFull",
    "AdapterSet",
    "AdapterUnloadable",
    "TooManyAdapters",
    "UnknownAdapter",
    "adapter_file",
    "read_adapter",
]

logger = logging.getLogger(__name__)

# A request's adapters, in its order (the order diffusers' set_adapters sums them in): ((name, scale), ...).
AdapterSet = tuple[tuple[str, float], ...]


class UnknownAdapter(EngineError):
    """A request names an adapter the server does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(known) if known else "none are configured"
        super().__init__(f"unknown LoRA adapter {name!r}; known adapters: {listed}")
        self.name = name


class AdapterUnloadable(EngineError):
    """An adapter of the directory could not be read or loaded (the reason names the file: for the log)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


class AdapterPoolFull(EngineError):
    """Every loaded adapter is held by a request in flight: none can be evicted for a new one now."""


class TooManyAdapters(EngineError):
    """A request names more adapters of the directory than the pool can hold at once besides the start-up ones: it
    could never run, however long it waited."""

    def __init__(self, names: list[str], room: int, capacity: int, pinned: int) -> None:
        listed = ", ".join(repr(name) for name in names)
        super().__init__(
            f"this request names {len(names)} adapters of the adapter directory ({listed}), but this server holds "
            f"at most {room} of them at once (--max-loras {capacity}, less the {pinned} named with --lora); "
            f"name at most {room}"
        )
        self.room = room


ERRORS = (UnknownAdapter, AdapterUnloadable, AdapterPoolFull, TooManyAdapters)  # a request's adapters may fail so


class AdapterGate:
    """Lets passes with the same adapter set run together and switches the modules between sets (see the module
    docstring). ``activate(adapter_set)`` is called with no pass running; ``exclusive()`` runs alone."""

    def __init__(self, activate: Any) -> None:
        self._activate = activate
        self._cond = threading.Condition()
        self._active: object = ()  # what the modules are set to; None: unknown (after a load or an eviction)
        self._holders = 0
        self._waiting: deque[tuple[object, object]] = deque()  # (ticket, adapter set or an exclusive ticket)
        self._admitted: set[object] = set()  # tickets let into the current phase, not in yet
        self.switches = 0

    def _may_enter(self, ticket: object, wanted: object) -> bool:
        if ticket in self._admitted:
            return True
        if self._admitted:  # a phase was opened for waiters not in yet: they go first
            return False
        if self._holders == 0:
            return self._waiting[0][0] is ticket  # the oldest waiter opens the next phase
        # Join the running phase only while nobody waits for another set (phase-fair: no set starves).
        return self._active == wanted and all(other == wanted for _, other in self._waiting)

    @contextlib.contextmanager
    def _enter(self, wanted: object, switch: Any) -> Iterator[None]:
        ticket = object()
        with self._cond:
            self._waiting.append((ticket, wanted))
            try:
                self._cond.wait_for(lambda: self._may_enter(ticket, wanted))
            finally:
                self._waiting.remove((ticket, wanted))
            if ticket in self._admitted:
                self._admitted.discard(ticket)
            elif self._holders == 0:
                if self._active != wanted:
                    try:
                        switch()
                    except BaseException:
                        self._active = None  # half switched, perhaps: the next pass switches again
                        self._cond.notify_all()  # the next waiter opens its phase
                        raise
                # Every waiter of this set comes in with the opener: one switch serves them all.
                self._admitted.update(other for other, set_ in self._waiting if set_ == wanted)
            self._holders += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                self._cond.notify_all()

    def use(self, adapter_set: AdapterSet) -> contextlib.AbstractContextManager[None]:
        """Hold the modules at ``adapter_set`` for one pass."""

        def switch() -> None:
            self._activate(adapter_set)
            self._active = adapter_set
            self.switches += 1

        return self._enter(adapter_set, switch)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Run alone (no pass in flight): for loading and evicting adapters. The modules' state is unknown after."""
        alone = object()  # equal to nothing else: never shared

        def forget() -> None:
            self._active = None

        return self._enter(alone, forget)


@dataclass
class _Loaded:
    holders: int = 0
    permanent: bool = False
    last_used: float = field(default_factory=time.monotonic)


class AdapterPool:
    """The server's adapters: those named at start-up (``sources``, loaded now) and those in ``directory`` (by file
    name without ``.safetensors``; loaded on first use, at most ``capacity`` loaded at once)."""

    def __init__(
        self, pipeline: Any, sources: dict[str, Path], directory: Path | None = None, capacity: int = 8
    ) -> None:
        if capacity < len(sources):
            raise ValueError(f"--max-loras {capacity} is below the {len(sources)} adapters named with --lora")
        self.pipeline = pipeline
        self.sources = dict(sources)
        self.directory = directory
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="lora-loader")
        self.gate = AdapterGate(self._activate)
        self._install(pipeline.transformer)
        for name, path in self.sources.items():
            self._load(name, path, permanent=True)

    # -- what exists -----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every adapter a request may name: the start-up ones, then the directory's (read now: files added while
        the server runs are found)."""
        names = list(self.sources)
        if self.directory is not None and self.directory.is_dir():
            names += sorted(p.stem for p in self.directory.glob(f"*{ADAPTER_SUFFIX}") if p.stem not in self.sources)
        return names

    def _path_of(self, name: str) -> Path:
        if name in self.sources:
            return self.sources[name]
        if self.directory is not None and "/" not in name and "\\" not in name and not name.startswith("."):
            candidate = self.directory / f"{name}{ADAPTER_SUFFIX}"
            if candidate.is_file():
                return candidate
        raise UnknownAdapter(name, self.names())

    @property
    def room(self) -> int:
        """How many directory adapters can be loaded at once: the pool less the start-up ones, which never leave."""
        return self.capacity - len(self.sources)

    def check(self, adapter_set: AdapterSet) -> None:
        """UnknownAdapter for the first name in ``adapter_set`` that the server does not have; TooManyAdapters when it
        names more directory adapters than the pool can ever hold at once (each is held while the request runs)."""
        for name, _ in adapter_set:
            if name not in self._loaded:
                self._path_of(name)
        directory = list(dict.fromkeys(name for name, _ in adapter_set if name not in self.sources))
        if len(directory) > self.room:
            raise TooManyAdapters(directory, self.room, self.capacity, len(self.sources))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            loaded = list(self._loaded)
        return {
            "loaded": loaded,
            "available": self.names(),
            "capacity": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
            "switches": self.gate.switches,
        }

    # -- holding adapters for a request --------------------------------------------------------------------------

    def acquire(self, adapter_set: AdapterSet) -> Future[None]:
        """Load what ``adapter_set`` lacks (on the loader thread) and hold all of it against eviction until
        ``release``; the future fails with UnknownAdapter, AdapterPoolFull or ValueError (an unreadable file)."""
        self.check(adapter_set)
        return self._loader.submit(self._hold, adapter_set)

    def _hold(self, adapter_set: AdapterSet) -> None:
        held: list[str] = []
        try:
            for name in dict.fromkeys(name for name, _ in adapter_set):
                with self._lock:
                    entry = self._loaded.get(name)
                if entry is None:
                    self.misses += 1
                    entry = self._load_named(name)
                else:
                    self.hits += 1
                with self._lock:
                    entry.holders += 1
                    entry.last_used = time.monotonic()
                    self._loaded.move_to_end(name)
                held.append(name)
        except BaseException:
            self._unhold(held)
            raise

    @contextlib.asynccontextmanager
    async def hold(self, adapter_set: AdapterSet, wait: Callable[[asyncio.Future[None]], Awaitable[Any]]) -> Any:
        """``acquire`` for a coroutine: ``wait(loading)`` waits for the load (the engine races it with the client's
        departure and the deadline); the adapters are held inside the block. Given up waiting, the load still
        finishes in its thread, and what it holds is let go then."""
        loading = asyncio.wrap_future(self.acquire(adapter_set))
        try:
            await wait(loading)
        except BaseException:
            loading.add_done_callback(lambda done: self._release_if_held(done, adapter_set))
            raise
        try:
            yield
        finally:
            self.release(adapter_set)

    @staticmethod
    def refuse(adapter_set: AdapterSet) -> Any:
        """Where the server has no pool: any named adapter is unknown."""
        raise UnknownAdapter(adapter_set[0][0], [])

    def _release_if_held(self, done: asyncio.Future[None], adapter_set: AdapterSet) -> None:
        if not done.cancelled() and done.exception() is None:
            self.release(adapter_set)

    def release(self, adapter_set: AdapterSet) -> None:
        self._unhold(list(dict.fromkeys(name for name, _ in adapter_set)))

    def _unhold(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                self._loaded[name].holders -= 1

    def _load_named(self, name: str) -> _Loaded:
        path = self._path_of(name)
        try:
            return self._load(name, path)
        except ValueError as exc:
            logger.error("LoRA adapter %s: %s", name, exc)
            raise AdapterUnloadable(name, str(exc)) from None

    def _load(self, name: str, path: Path, permanent: bool = False) -> _Loaded:
        """Loader thread (or start-up): read, make room, inject while no pass runs."""
        state = read_adapter(type(self.pipeline), path)
        self._make_room()
        with self.gate.exclusive(), quiet_load(name):
            try:
                self.pipeline.load_lora_weights(state, adapter_name=name)
            except Exception as exc:  # noqa: BLE001 - a mismatched file: say so, leave the modules as they were
                with contextlib.suppress(Exception):
                    self.pipeline.delete_adapters(name)
                raise ValueError(f"{path}: does not fit this model ({type(exc).__name__}: {exc})") from None
        entry = _Loaded(permanent=permanent)
        with self._lock:
            self._loaded[name] = entry
        logger.info("LoRA adapter %s loaded from %s", name, path)
        return entry

    def _make_room(self) -> None:
        with self._lock:
            if len(self._loaded) < self.capacity:
                return
            victims = [n for n, e in self._loaded.items() if not e.permanent and e.holders == 0]
            if not victims:
                raise AdapterPoolFull(
                    f"all {self.capacity} loaded LoRA adapters are in use (--max-loras); retry when one is free"
                )
            victim = victims[0]  # the OrderedDict runs from least to most recently used
            del self._loaded[victim]
        with self.gate.exclusive():
            self.pipeline.delete_adapters(victim)
        logger.info("LoRA adapter %s evicted (pool of %d full)", victim, self.capacity)

    # -- the passes ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def bound(self, adapter_set: AdapterSet) -> Iterator[None]:
        """The calling thread's transformer passes run with ``adapter_set`` (empty: the base model)."""
        previous = getattr(self._local, "adapters", ())
        self._local.adapters = tuple(adapter_set)
        try:
            yield
        finally:
            self._local.adapters = previous

    def _install(self, transformer: Any) -> None:
        forward = transformer.forward

        @functools.wraps(forward)
        def gated(*args: Any, **kwargs: Any) -> Any:
            with self.gate.use(getattr(self._local, "adapters", ())):
                return forward(*args, **kwargs)

        transformer.forward = gated

    def _activate(self, adapter_set: AdapterSet) -> None:
        transformer = self.pipeline.transformer
        if not adapter_set:
            if self._loaded:
                transformer.disable_lora()
            return
        transformer.enable_lora()
        transformer.set_adapters([name for name, _ in adapter_set], [scale for _, scale in adapter_set])

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
