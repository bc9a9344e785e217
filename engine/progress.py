"""One admitted request's bookkeeping, how its progress reaches the event loop from a worker thread, and how its
outcome reaches the engine's listeners.

A ``Ticket`` is made by ``Engine.submit`` for each request: its cancel flag (set when the client leaves, the deadline
passes or the drain ends), its timestamps, and its progress callback. The runner's step callback
(``Ticket.step_callback``) records the first step, raises ``GenerationCancelled`` once the request is abandoned,
and reports a ``step`` event, with preview images when one is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .tasks import get_task
from .types import (
    ClientGone,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    GenerationTimeout,
    NotReady,
    OutOfMemory,
    Overloaded,
    Previewer,
    Progress,
    ProgressEvent,
    StepCallback,
    TooLarge,
)

logger = logging.getLogger(__name__)

__all__ = ["Ticket", "counter_of", "notify", "tell_listeners"]


def notify(progress: Progress, event: ProgressEvent) -> None:
    """Call a progress callback on the event loop; its failure is logged, never the engine's."""
    try:
        progress(event)
    except Exception:  # noqa: BLE001 - a listener's bug must not break admission
        logger.exception("progress callback failed")


Submit = Callable[..., Awaitable[GenerationResult]]


def tell_listeners(submit: Submit) -> Submit:
    """Wraps ``Engine.submit``: its outcome, the result or the exception it raises, goes to every listener."""

    @functools.wraps(submit)
    async def submit_and_tell(self: Any, request: GenerationRequest, *args: Any, **kwargs: Any) -> GenerationResult:
        try:
            result = await submit(self, request, *args, **kwargs)
        except BaseException as exc:
            self._tell(request, exc)
            raise
        self._tell(request, result)
        return result

    return submit_and_tell


def counter_of(exc: Exception, gone: asyncio.Event) -> str:
    """The ``Engine.stats`` counter a failed ``submit`` counts in."""
    if isinstance(exc, ClientGone):
        # A ``gone`` that says it is a cancel (a job's DELETE) is not a client that left.
        return "cancelled" if getattr(gone, "cancelled", False) else "disconnected"
    if isinstance(exc, (Overloaded, TooLarge, NotReady)):
        return "rejected"  # refused without work, or stopped by the end of a drain
    if isinstance(exc, GenerationTimeout):
        return "timed_out"
    return "out_of_memory" if isinstance(exc, OutOfMemory) else "failed"


@dataclass(eq=False)  # hashed by identity: the engine keeps its running tickets in a set
class Ticket:
    """An admitted (or queued) request: what stops it, when it arrived, started and first stepped, who listens."""

    request: GenerationRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    first_step_at: float | None = None
    started_at: float | None = None
    progress: Progress | None = None
    loop: asyncio.AbstractEventLoop | None = None
    served: Any = None  # its model (engine.served.Served), once held
    cost: int = 0  # its estimated peak memory (bytes) while it runs, held against the memory budget
    steps_done: int = 0
    total_steps: int = 0

    def seconds_left(self, now: float) -> float | None:
        """Its denoising time left, at the pace of its steps so far (None: it has not stepped yet)."""
        if not self.steps_done or self.started_at is None:
            return None
        return (now - self.started_at) / self.steps_done * (self.total_steps - self.steps_done)

    def report(self, event: ProgressEvent) -> None:
        """From a worker thread: hand ``event`` to the progress callback on the event loop."""
        if self.progress is not None and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
                self.loop.call_soon_threadsafe(self.progress, event)

    def step_callback(self, previewer: Previewer | None, log_interval: float = 0) -> StepCallback:
        """The ``on_step(step_index, latents)`` the runner calls after every denoising step (in a worker thread).
        With ``log_interval``, a generation running longer than that logs its step every ``log_interval`` seconds,
        so a slow one (a large image on a CPU) shows in the server's log that it is alive."""
        total = get_task(self.request.task).steps(self.request)
        logged_at = time.monotonic()

        def on_step(step: int, latents: Any = None) -> None:
            nonlocal logged_at
            now = time.monotonic()
            self.steps_done, self.total_steps = step + 1, total
            if self.first_step_at is None:
                self.first_step_at = now
            if self.cancel.is_set():
                raise GenerationCancelled
            elapsed = now - (self.started_at or now)
            if log_interval and now - logged_at >= log_interval:
                logged_at = now
                logger.info("request %s: step %d/%d after %.1f s", self.request.request_id, step + 1, total, elapsed)
            if self.progress is not None:
                event = ProgressEvent("step", step=step + 1, total=total, elapsed_s=elapsed)
                event.previews = self._previews(previewer, step + 1, total, latents)
                self.report(event)

        return on_step

    def _previews(self, previewer: Previewer | None, done: int, total: int, latents: Any) -> list[Any] | None:
        """Preview images when one is due after ``done`` steps (never after the last: the image itself follows)."""
        every = self.request.preview_every
        if not every or previewer is None or latents is None:
            return None
        if done % every or done >= total:
            return None
        try:
            return previewer(latents)
        except Exception:  # noqa: BLE001 - a failed preview must not fail the generation
            logger.exception("preview failed in request %s", self.request.request_id)
            return None
