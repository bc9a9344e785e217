"""A job: a generation that runs on its own, watched and fetched by id, whatever store keeps it.

A job is not tied to the request that created it: it runs as an asyncio task owned by its store and lives on when
its client disconnects; cancelling it sets the ``gone`` event the engine watches (a queued job never runs, a running
one stops at its next step). Admission is the engine's, as for every request (see ``memory.JobStore.start``).

Events go to any number of subscribers, each through a small bounded queue: a subscriber that reads slowly loses
intermediate ``queued``/``step``/``preview`` events, never ``started`` or ``done``, and never holds the job up.
Preview images are encoded (PNG, base64) off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from jobs.errors import Failure, FailureOf, failure_body

logger = logging.getLogger(__name__)

__all__ = ["FINAL", "KEEP_ALIVE_S", "Finisher", "Job", "Subscriber", "follow_job", "run_outcome"]

FINAL = frozenset({"succeeded", "failed", "cancelled"})
# Events a slow subscriber may lose: each is superseded by a later one of its kind (or by "done").
_DROPPABLE = frozenset({"queued", "step", "preview"})

KEEP_ALIVE_S = 15.0  # a comment line on an idle event stream, so proxies and clients do not time it out
# What a finished job's result is made of: (generation, engine result) -> the synchronous API's JSON answer.
Finisher = Callable[[Any, Any], Awaitable[dict[str, Any]]]


class Subscriber:
    """One reader of a job's events: a bounded queue that drops the oldest droppable event when full."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._events: deque[tuple[str, dict[str, Any]]] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, name: str, data: dict[str, Any]) -> None:
        if len(self._events) >= self.capacity:
            victim = next((e for e in self._events if e[0] in _DROPPABLE), None)
            if victim is not None:
                self._events.remove(victim)
                self.dropped += 1
        self._events.append((name, data))
        self._ready.set()

    async def get(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The next event, or None when ``timeout`` seconds pass without one."""
        if not self._events:
            self._ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        return self._events.popleft() if self._events else None


class CancelEvent(asyncio.Event):
    """A job's ``gone`` event: only a cancel (``DELETE``) sets it, so the engine counts the job as cancelled, not as a
    client that disconnected (a job outlives its clients)."""

    cancelled = True


class Job:
    """One job's state, its progress callback (from the engine) and its subscribers."""

    def __init__(self, generation: Any) -> None:
        from engine.tasks import get_task

        self.id = secrets.token_urlsafe(16)  # 128 random bits: the id is unguessable
        self.generation = generation
        # What the engine's step events count to: every step, or the part an edit's strength leaves.
        self.total_steps = get_task(generation.task).steps(generation)
        self.created_at = time.time()
        self.status = "queued"
        self.position: int | None = None
        self.step = 0
        self.elapsed_s: float | None = None  # at the last step, since the job left the queue
        self.last_step_at: float | None = None  # monotonic
        self.finished_at: float | None = None  # monotonic
        self.result: dict[str, Any] | None = None
        self.error: Failure | None = None
        self.gone = CancelEvent()  # set to cancel
        self.task: asyncio.Task[None] | None = None
        self.subscribers: set[Subscriber] = set()
        self.last_preview: dict[str, Any] | None = None  # replayed to late subscribers while running
        self._encoding: asyncio.Task[None] | None = None  # the preview being encoded (at most one at a time)
        self._started_announced = False  # "started" went out (live, or in a replay)

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def eta_s(self) -> float | None:
        """Seconds left, from the step rate so far (elapsed / steps x remaining); None before the first step."""
        if self.status != "running" or not self.step or self.elapsed_s is None or self.last_step_at is None:
            return None
        left = self.elapsed_s / self.step * (self.total_steps - self.step)
        return round(max(0.0, left - (time.monotonic() - self.last_step_at)), 3)

    def to_dict(self) -> dict[str, Any]:
        """The job as ``GET /api/jobs/{id}`` answers it."""
        return {
            "id": self.id,
            "status": self.status,
            "created_at": round(self.created_at, 3),
            "position": self.position if self.status == "queued" else None,
            "step": self.step,
            "total_steps": self.total_steps,
            "eta_s": self.eta_s(),
            "seed": self.generation.seed,
            "result": self.result,
            "error": None if self.error is None else failure_body(self.error),
            # A durable store's: the runner's last renewal of its claim, and whether it stopped (jobs.records). This
            # process runs this job: it renews nothing, and waits for nobody.
            "runner_renewed_at": None,
            "waiting_for_takeover": False,
        }

    # -- events -----------------------------------------------------------------------------------------

    def subscribe(self) -> Subscriber:
        """A new subscriber, primed with the job's current state (replay), then fed live events."""
        subscriber = Subscriber()
        if self.finished:
            subscriber.put("done", self.to_dict())
            return subscriber
        if self.status == "queued" and self.position is not None:
            subscriber.put("queued", {"position": self.position})
        elif self.status == "running":
            subscriber.put("started", {})
            self._started_announced = True
            if self.step:
                subscriber.put("step", self._step_data())
            if self.last_preview is not None:
                subscriber.put("preview", self.last_preview)
        self.subscribers.add(subscriber)
        return subscriber

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        for subscriber in self.subscribers:
            subscriber.put(name, data)

    def _step_data(self) -> dict[str, Any]:
        elapsed = None if self.elapsed_s is None else round(self.elapsed_s, 3)
        return {"step": self.step, "total": self.total_steps, "elapsed_s": elapsed}

    def on_progress(self, event: Any) -> None:
        """The engine's progress callback (on the event loop): update the state, tell the subscribers."""
        if self.finished:
            return  # a step reported by the worker thread as the job was cancelled
        if event.type == "loading":  # several models: the job's model is being loaded (it holds no slot yet)
            self._publish("loading", {"model": event.model})
        elif event.type == "queued":
            self.position = event.position
            self._publish("queued", {"position": event.position})
        elif event.type == "started":
            # A job that took a free slot at once is "running" from then on, and a subscriber may have had its
            # "started" in the replay: announce it once.
            if not self._started_announced:
                self._publish("started", {})
            self.status, self.position, self._started_announced = "running", None, True
        elif event.type == "step":
            self.status = "running"  # a step may overtake "started" in the loop's queue: never go back
            self.step, self.elapsed_s, self.last_step_at = event.step, event.elapsed_s, time.monotonic()
            self._publish("step", self._step_data())
            if event.previews and self._encoding is None:  # one encoding at a time; a busy encoder skips one
                self._encoding = asyncio.create_task(self._encode_preview(event.step, event.previews))

    async def _encode_preview(self, step: int, images: list[Any]) -> None:
        from utils.image_store import encode_png

        try:
            encoded = await asyncio.to_thread(lambda: [base64.b64encode(encode_png(im)).decode() for im in images])
        except Exception:  # noqa: BLE001 - a failed preview must not fail the job
            logger.exception("job %s: preview encoding failed", self.id)
            return
        finally:
            self._encoding = None
        if not self.finished:
            self.last_preview = {"step": step, "total": self.total_steps, "images": encoded}
            self._publish("preview", self.last_preview)

    async def settle_previews(self) -> None:
        """Wait for a preview being encoded, so it goes out before ``done`` and no task outlives the job."""
        if self._encoding is not None:
            await asyncio.wait({self._encoding})

    def finish(self, status: str, result: dict[str, Any] | None = None, error: Failure | None = None) -> None:
        """Record the outcome and send ``done``; the subscribers end their streams after it."""
        self.status, self.result, self.error = status, result, error
        self.finished_at = time.monotonic()
        self.last_preview = None
        self._publish("done", self.to_dict())
        self.subscribers.clear()


async def follow_job(job: Job, subscriber: Subscriber) -> AsyncIterator[tuple[str, dict[str, Any]] | None]:
    """``subscriber``'s events of ``job`` until ``done`` (None: ``KEEP_ALIVE_S`` passed without one); it leaves the
    job's subscribers when the reader stops."""
    try:
        while True:
            event = await subscriber.get(KEEP_ALIVE_S)
            yield event
            if event is not None and event[0] == "done":
                return
    finally:
        job.subscribers.discard(subscriber)


async def run_outcome(
    job: Job, engine: Any, finisher: Finisher, failure_of: FailureOf
) -> tuple[str, dict[str, Any] | None, Failure | None]:
    """Run ``job`` on ``engine`` and build its result: its final (status, result, error), for ``Job.finish``; a
    failure is described by ``failure_of`` (the store's owner's)."""
    from engine import ClientGone, EngineError

    generation = job.generation
    try:
        try:
            result = await engine.submit(generation, job.gone, job.on_progress)
            if job.gone.is_set():
                raise ClientGone  # cancelled as it finished: the result is not wanted any more
            answer = await finisher(generation, result)
        finally:
            await job.settle_previews()
    except ClientGone:
        logger.info("job %s: cancelled at step %d", job.id, job.step)
        return "cancelled", None, None
    except EngineError as exc:
        return "failed", None, failure_of(exc, generation, engine)
    except Exception as exc:
        logger.exception("job %s (request %s) failed", job.id, generation.request_id)
        return "failed", None, failure_of(exc, generation, engine)
    return "succeeded", answer, None
