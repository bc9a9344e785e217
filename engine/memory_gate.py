"""The memory side of ``Engine``'s admission (``engine.memory_admission``): what the running requests hold, the
early refusals, and the measurement of a request that runs alone. A mixin: it reads the engine's bookkeeping
(``_running``, ``_waiting``, ``_active``, ``_epoch``), touched on the event loop thread only, except where said."""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING, Any

from .progress import Ticket
from .types import MemoryWait, TooLarge, TooLargeForMemory

if TYPE_CHECKING:
    import asyncio

    from .memory_admission import MemoryAdmission

__all__ = ["MemoryGate"]


class MemoryGate:
    """Memory admission for ``Engine`` (see the module's docstring)."""

    memory: MemoryAdmission | None
    max_pixels: int
    log_interval: float
    _running: set[Ticket]
    _waiting: dict[asyncio.Future[None], Ticket]
    _active: int
    _epoch: int

    def _memory_of(self, ticket: Ticket) -> MemoryAdmission | None:
        """The memory admission of the request's model (the engine's own before its model is known)."""
        return ticket.served.memory if ticket.served is not None else self.memory

    @property
    def memory_held(self) -> int:
        """Bytes of measured memory the running requests hold (estimated; 0 without memory admission)."""
        return sum(t.cost for t in self._running)

    def _refuse_early(self, ticket: Ticket) -> None:
        """Refuse what can never run (over the pixel or memory budget) or would wait too long for memory."""
        pixels = ticket.request.pixels
        if self.max_pixels and pixels > self.max_pixels:
            raise TooLarge(pixels, self.max_pixels)
        memory = self._memory_of(ticket)
        if memory is None:
            return
        ticket.cost = memory.request_cost(ticket.request)
        if not memory.fits_alone(ticket.cost):
            request = ticket.request
            guided = request.guidance_scale is None or request.guidance_scale > 1
            message = memory.refusal(request.width, request.height, request.num_images, guided) or ""
            raise TooLargeForMemory(message, ticket.cost, memory.budget)
        now, ahead = time.monotonic(), sum(t.cost for t in self._waiting.values())
        wait = memory.wait(ticket.cost, ahead, [(t.cost, t.seconds_left(now)) for t in self._running])
        if wait is not None and memory.max_wait and wait > memory.max_wait:
            raise MemoryWait(wait, max(1, math.ceil(wait)))

    def _measured(self, ticket: Ticket) -> list[Any]:
        """Run the request; if it ran alone, its peak memory teaches the estimate (``MemoryAdmission.observe``)."""
        served = ticket.served
        on_step = ticket.step_callback(served.previewer, self.log_interval)
        call = functools.partial(served.runner, ticket.request, on_step)
        epoch = self._epoch  # read from the worker thread: a start since changes it
        memory = served.memory
        if memory is None or self._active != 1:
            return call()
        images: list[Any] = []
        peak = memory.meter.measure(lambda: images.extend(call()))
        if self._epoch == epoch and self._active == 1:
            memory.observe(ticket.request, peak)
        return images
