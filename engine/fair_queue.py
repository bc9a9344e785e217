"""The engine's wait queue, shared fairly between models (issue 30: several models in one server).

One model (every request's ``model`` the same) makes it the FIFO it always was. With several:

- **slots**: when a slot frees, it goes to the head of the model with the fewest requests running now; between
  models running as many, to the one whose last request started longest ago (round robin), then to the head that
  arrived first. A burst of one model's requests then takes the slots
  only while nobody else waits: each other model's next request starts at the next free slot, whatever the burst's
  length. Within a model the order stays first come, first served. The head chosen is the one that waits for its
  pixels and memory (it holds the others back, as the FIFO's head did), so a large request is never starved.
- **the queue's bound** (``max_queue``) is shared: when it is full, a request of a model holding fewer waiters than
  the model holding the most takes the place of that model's newest waiter, which is answered as a request that
  found the queue full is (``Overloaded``, 503 with Retry-After). With one model, or models queueing as many, a
  request that finds the queue full is refused itself, as before. Over time every model that keeps asking holds an
  equal share of the queue (the longest queue drops, a classic of fair queueing), and a burst never locks another
  model out.

Touched only on the event loop thread (the engine's bookkeeping rule): no lock.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import Iterator, Mapping

from .progress import notify
from .types import Overloaded, Progress, ProgressEvent

__all__ = ["FairQueue", "FairShare"]

Waiter = asyncio.Future[None]
Key = tuple[int, int, int]  # (running, last start, arrival): the smallest is served first


class FairQueue:
    """Waiters by model, served as the module's docstring says."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Waiter]] = {}
        self._arrival: dict[Waiter, int] = {}  # each waiter's place in the order of arrival
        self._model: dict[Waiter, str] = {}
        self._counter = itertools.count()
        self._started: dict[str, int] = {}  # when each model's last request took a slot (a count of starts)
        self._starts = itertools.count(1)

    def __len__(self) -> int:
        return len(self._arrival)

    def __bool__(self) -> bool:
        return bool(self._arrival)

    def __contains__(self, waiter: object) -> bool:
        return waiter in self._arrival

    def count(self, model: str) -> int:
        """Waiters of ``model``."""
        queue = self._queues.get(model)
        return len(queue) if queue else 0

    def counts(self) -> dict[str, int]:
        """Waiters per model (models with none left out)."""
        return {model: len(queue) for model, queue in self._queues.items() if queue}

    def push(self, waiter: Waiter, model: str) -> None:
        self._queues.setdefault(model, deque()).append(waiter)
        self._arrival[waiter] = next(self._counter)
        self._model[waiter] = model

    def remove(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out (False: it was not in)."""
        model = self._model.pop(waiter, None)
        if model is None:
            return False
        del self._arrival[waiter]
        queue = self._queues[model]
        queue.remove(waiter)
        if not queue:
            del self._queues[model]
        return True

    def started(self, model: str) -> None:
        """A request of ``model`` took a slot (queued or not): it goes behind the others in the round robin."""
        self._started[model] = next(self._starts)

    def _key(self, model: str, waiter: Waiter, running: Mapping[str, int], started: Mapping[str, int]) -> Key:
        return running.get(model, 0), started.get(model, 0), self._arrival[waiter]

    def head(self, running: Mapping[str, int]) -> Waiter | None:
        """The waiter the next free slot goes to, given the requests ``running`` per model (None: nobody waits)."""
        best: Key | None = None
        chosen: Waiter | None = None
        for model, queue in self._queues.items():
            key = self._key(model, queue[0], running, self._started)
            if best is None or key < best:
                best, chosen = key, queue[0]
        return chosen

    def order(self, running: Mapping[str, int]) -> Iterator[Waiter]:
        """Every waiter, in the order the slots would go to them if nobody left or arrived (1 = next): the
        positions a queued request is told."""
        running = Counter(running)
        started = dict(self._started)
        later = itertools.count(max(started.values(), default=0) + 1)
        fronts = dict.fromkeys(self._queues, 0)
        for _ in range(len(self._arrival)):
            best: Key | None = None
            pick = ""
            for model, index in fronts.items():
                queue = self._queues[model]
                if index < len(queue):
                    key = self._key(model, queue[index], running, started)
                    if best is None or key < best:
                        best, pick = key, model
            yield self._queues[pick][fronts[pick]]
            fronts[pick] += 1
            running[pick] += 1
            started[pick] = next(later)

    def displaced_by(self, model: str) -> Waiter | None:
        """The queue is full and a request of ``model`` arrives: the waiter whose place it takes (the newest of the
        model holding the most waiters, when that is more than ``model`` holds), or None: the newcomer is refused."""
        if not self._queues:
            return None
        mine = self.count(model)
        # Between models queueing as many, the one whose newest waiter came last gives it up.
        longest = max(self._queues, key=lambda m: (len(self._queues[m]), self._arrival[self._queues[m][-1]]))
        if longest == model or len(self._queues[longest]) <= mine:
            return None
        return self._queues[longest][-1]


class FairShare:
    """The engine's side of the fair queue (a mixin of ``Engine``): shedding for a newcomer, telling positions."""

    _waiters: FairQueue
    _running_by_model: Counter[str]
    _positions: dict[Waiter, Progress]
    _told: dict[Waiter, int]

    def by_model(self) -> dict[str, tuple[int, int]]:
        """Generations (running, waiting for a slot) now, per model that has any (GET /metrics)."""
        waiting = self._waiters.counts()
        names = {name for name, n in self._running_by_model.items() if n} | set(waiting)
        return {name: (self._running_by_model[name], waiting.get(name, 0)) for name in names}

    def _shed_for(self, model: str) -> None:
        """The queue is full: make room for a request of ``model`` by shedding the newest waiter of a model that holds
        more of the queue (it is answered ``Overloaded``), or raise ``Overloaded`` (engine.fair_queue)."""
        shed = self._waiters.displaced_by(model)
        if shed is None:
            raise Overloaded
        self._waiters.remove(shed)
        shed.set_exception(Overloaded())

    def _announce_positions(self) -> None:
        """Tell every waiter that asked for progress its place in the queue (the queue moved): 1 = the next to start,
        in the order the fair queue would start them."""
        if not self._positions:
            return
        for position, waiter in enumerate(self._waiters.order(self._running_by_model), start=1):
            progress = self._positions.get(waiter)
            if progress is not None and self._told.get(waiter) != position:
                self._told[waiter] = position
                notify(progress, ProgressEvent("queued", position=position))
