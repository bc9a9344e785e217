"""What the engine runs a request on, and where it gets it: one model's runner, previewer, LoRA pool and memory
admission (``Served``), from a ``ModelSource`` when the server has several models.

An ``Engine`` built with one model keeps them as its own attributes (``runner``, ``previewer``, ``adapters``,
``memory``), as it always did. Built with ``models`` (a ``ModelSource``), it asks the source for the request's model
(``GenerationRequest.model``) before anything else: the source holds the model resident while the request runs (a
model in use is never unloaded) and may have to load it first, which the request waits for, bounded by its deadline
and its client's presence, without holding a slot. What a model is, how it is loaded and what is evicted for it are
the source's business (the server's model registry, wired by the API layer): the engine knows none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .adapters import AdapterPool
from .progress import Ticket
from .types import GenerationRequest, Overloaded

if TYPE_CHECKING:
    from .fair_queue import FairQueue
    from .memory_admission import MemoryAdmission
    from .types import Previewer, Progress, Runner

__all__ = ["Holds", "ModelSource", "Served", "Wait"]

# wait(loading): waits for an awaitable as the engine waits for anything a request needs (racing the client's
# departure, the drain's end and the request's deadline), raising the engine's error when one of them comes first.
Wait = Callable[[Any], Awaitable[Any]]


@dataclass
class Served:
    """One model as the engine runs it."""

    runner: Runner
    previewer: Previewer | None = None
    adapters: AdapterPool | None = None
    memory: MemoryAdmission | None = None
    name: str = ""  # the model's name ("" for an engine's only model)

    def close(self) -> None:
        """Stop what the model's runner and LoRA pool started (threads); the weights are the loader's to free."""
        if self.adapters is not None:
            self.adapters.close()
        close_runner = getattr(self.runner, "close", None)
        if callable(close_runner):
            close_runner()


class ModelSource(Protocol):
    """Where an engine of several models gets each request's model (see the module's docstring)."""

    def hold(self, name: str, wait: Wait, progress: Progress | None) -> contextlib.AbstractAsyncContextManager[Served]:
        """The model ``name`` (resolved already: a name the source knows), held inside the block. A load is awaited
        with ``wait``; while it loads, ``progress`` (when given) is told a ``loading`` event naming the model."""
        ...


class Holds:
    """What a request holds before it takes a slot, for ``Engine`` (a mixin): its model, then its LoRA adapters."""

    models: ModelSource | None
    runner: Runner
    previewer: Previewer | None
    adapters: AdapterPool | None
    memory: MemoryAdmission | None
    max_queue: int
    _waiters: FairQueue
    # and Engine's _fits(ticket) and _race(main, gone, deadline)

    def _model_held(self, ticket: Ticket, gone: asyncio.Event, deadline: float | None) -> Any:
        """The request's model (``engine.served``): the engine's own, or the source's, held until the request ends
        (loaded first if it must be, before the request takes a slot or a place in the queue)."""
        if self.models is None:
            return contextlib.nullcontext(Served(self.runner, self.previewer, self.adapters, self.memory))
        self._refuse_if_full(ticket)
        return self.models.hold(
            ticket.request.model, lambda loading: self._race(loading, gone, deadline), ticket.progress
        )

    def _adapters_held(
        self, request: GenerationRequest, served: Served, gone: asyncio.Event, deadline: float | None
    ) -> Any:
        """The request's LoRA adapters, loaded before it takes a slot (no slot waits on a file) and held until it
        ends (``AdapterPool.hold``, which refuses names it lacks); a full queue still refuses at once."""
        if not request.loras:
            return contextlib.nullcontext()
        self._refuse_if_full(Ticket(request, served=served))
        pool = served.adapters or AdapterPool.refuse(request.loras)
        return pool.hold(request.loras, lambda loading: self._race(loading, gone, deadline))

    def _refuse_if_full(self, ticket: Ticket) -> None:
        """Before waiting for anything (a model's load, an adapter's), refuse what the queue would refuse now."""
        if len(self._waiters) < self.max_queue or self._fits(ticket):
            return
        if self._waiters.displaced_by(ticket.request.model) is None:
            raise Overloaded
