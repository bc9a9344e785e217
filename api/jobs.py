"""Jobs: generations that run on their own, watched and fetched by id (``POST /api/jobs``, ``api/routes/jobs.py``).

A job is not tied to the HTTP request that created it: it runs as an asyncio task owned by the ``JobStore`` and
lives on when its client disconnects; cancelling it sets the ``gone`` event the engine watches (a queued job never
runs, a running one stops at its next step). Admission is the engine's, as for every request (see
``JobStore.start``).

Events (the SSE stream of ``GET /api/jobs/{id}/events``) go to any number of subscribers, each through a small
bounded queue: a subscriber that reads slowly loses intermediate ``queued``/``step``/``preview`` events, never
``started`` or ``done``, and never holds the job up. Preview images are encoded (PNG, base64) off the event loop.

The store is bounded (``--max-jobs``): when it is full, the oldest job that may go makes room; when none may, a new
one is refused 503 ``too_many_jobs``. A succeeded or failed job may go once its ``--job-grace`` has passed since it
ended, so its client can fetch the outcome whatever others do: otherwise anyone could evict other users' results at
once with pairs of POST and DELETE. A cancelled job may go at once (its end was the answer to the DELETE, and there is
nothing to fetch), so that churn evicts only itself. Finished jobs expire ``--job-ttl`` seconds after they end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from api.errors import APIError, envelope, internal_error

logger = logging.getLogger(__name__)

__all__ = ["FINAL", "KEEP_ALIVE_S", "Job", "JobStore", "Subscriber", "run_outcome", "too_many_jobs"]

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
        from api.generation import steps_run

        self.id = secrets.token_urlsafe(16)  # 128 random bits: the id is unguessable
        self.generation = generation
        self.total_steps = steps_run(generation)  # what the engine's step events count to
        self.created_at = time.time()
        self.status = "queued"
        self.position: int | None = None
        self.step = 0
        self.elapsed_s: float | None = None  # at the last step, since the job left the queue
        self.last_step_at: float | None = None  # monotonic
        self.finished_at: float | None = None  # monotonic
        self.result: dict[str, Any] | None = None
        self.error: APIError | None = None
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
        error = None
        if self.error is not None:
            error = envelope(self.error.message, self.error.type, self.error.param, self.error.code)["error"]
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
            "error": error,
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
        if event.type == "queued":
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

    def finish(self, status: str, result: dict[str, Any] | None = None, error: APIError | None = None) -> None:
        """Record the outcome and send ``done``; the subscribers end their streams after it."""
        self.status, self.result, self.error = status, result, error
        self.finished_at = time.monotonic()
        self.last_preview = None
        self._publish("done", self.to_dict())
        self.subscribers.clear()


class JobStore:
    """The jobs by id: bounded (``max_jobs``), finished ones expire after ``ttl`` seconds (0: never) and are kept at
    least ``grace`` seconds (cancelled ones excepted) however full the store is."""

    def __init__(self, max_jobs: int, ttl: float, grace: float = 0.0) -> None:
        self.max_jobs = max_jobs
        self.ttl = ttl
        self.grace = grace
        self._jobs: dict[str, Job] = {}  # in creation order (eviction goes oldest first)
        self._prune_task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def ids(self) -> list[str]:
        """The ids held now (expired ones included until pruned), oldest first."""
        return list(self._jobs)

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None and self._expired(job, time.monotonic()):
            self._jobs.pop(job_id, None)
            return None
        return job

    def _expired(self, job: Job, now: float) -> bool:
        return self.ttl > 0 and job.finished_at is not None and now - job.finished_at >= self.ttl

    def prune(self) -> int:
        """Drop expired jobs; return how many."""
        now = time.monotonic()
        expired = [job_id for job_id, job in self._jobs.items() if self._expired(job, now)]
        for job_id in expired:
            del self._jobs[job_id]
        return len(expired)

    def _kept_for(self, job: Job, now: float) -> float | None:
        """Seconds ``job`` must still be kept (0: it may go now); None while it is unfinished."""
        if job.finished_at is None:
            return None
        if job.status == "cancelled":
            return 0.0
        return max(0.0, job.finished_at + self.grace - now)

    def _make_room(self) -> None:
        self.prune()
        now = time.monotonic()
        while len(self._jobs) >= self.max_jobs:
            waits = {job_id: self._kept_for(job, now) for job_id, job in self._jobs.items()}
            oldest = next((job_id for job_id, wait in waits.items() if wait == 0.0), None)
            if oldest is None:
                raise too_many_jobs("server", len(self._jobs), sorted(w for w in waits.values() if w is not None))
            del self._jobs[oldest]

    async def start(self, generation: Any, engine: Any, finisher: Finisher, timeout: float, context: Any = None) -> Job:
        """Create a job and submit it to ``engine``; raise an ``APIError`` (503) if it cannot be admitted.

        ``context`` (what a durable store keeps to build the finisher again) is not needed here. Admission without
        a race: the job's task calls ``engine.submit`` as its first step, and ``submit`` decides
        (a slot, a place in the queue, or Overloaded/NotReady) before it first suspends. Tasks start in the order
        they were scheduled, so after one ``sleep(0)`` here the job's task has already been admitted or refused:
        a refusal is answered now, as a 503, and no job exists; an admitted job holds its place.
        """
        from api.generation import log_generation

        self._make_room()
        job = Job(generation)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, engine, finisher, timeout), name=f"job-{job.id[:8]}")
        await asyncio.sleep(0)
        if job.task.done() and job.status == "failed" and job.error is not None:
            del self._jobs[job.id]
            raise job.error
        if job.position is None:
            # Not queued (that is announced at once): it took a free slot, and its thread is starting.
            job.status = "running"
        log_generation(generation, job.id)
        return job

    async def _run(self, job: Job, engine: Any, finisher: Finisher, timeout: float) -> None:
        job.finish(*await run_outcome(job, engine, finisher, timeout))

    def cancel(self, job: Job) -> None:
        """Ask the job to stop: a queued job never runs, a running one stops at its next step."""
        if not job.finished:
            job.gone.set()

    # -- what the routes ask (the same for every store: api/jobstores/durable.py) ------------------------

    async def describe(self, job_id: str) -> dict[str, Any] | None:
        """The job as ``GET`` answers it, or None when there is no such job (or it expired)."""
        job = self.get(job_id)
        return None if job is None else job.to_dict()

    async def stop(self, job_id: str) -> dict[str, Any] | None:
        """Cancel the job and answer its state once it has ended (10 s at most); None when there is no such job."""
        job = self.get(job_id)
        if job is None:
            return None
        self.cancel(job)
        if job.task is not None and not job.task.done():
            # The engine gives up on a cancelled request at once (its thread stops at the next step, in the
            # background), so the job's own task ends within moments; then the answer shows the final status.
            await asyncio.wait({job.task}, timeout=10)
        return job.to_dict()

    async def follow(self, job_id: str) -> AsyncIterator[tuple[str, dict[str, Any]] | None] | None:
        """The job's events (replay, then live, ending after ``done``; None: ``keep_alive`` seconds passed without
        one), or None when there is no such job."""
        job = self.get(job_id)
        return None if job is None else _events(job, job.subscribe())

    # -- life cycle -------------------------------------------------------------------------------------

    def open(self) -> None:
        """Start pruning expired jobs periodically (call from the event loop)."""
        if self.ttl > 0:
            self._prune_task = asyncio.create_task(self._prune_periodically(), name="job-prune")

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self.ttl / 4)))
            self.prune()

    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the jobs' tasks (the engine has drained: they are ending), then cancel what
        is left, so that no task is pending when the loop closes."""
        tasks = {job.task for job in self._jobs.values() if job.task is not None and not job.task.done()}
        if self._prune_task is not None:
            self._prune_task.cancel()
            tasks.add(self._prune_task)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _events(job: Job, subscriber: Subscriber) -> AsyncIterator[tuple[str, dict[str, Any]] | None]:
    try:
        while True:
            event = await subscriber.get(KEEP_ALIVE_S)
            yield event
            if event is not None and event[0] == "done":
                return
    finally:
        job.subscribers.discard(subscriber)


async def run_outcome(
    job: Job, engine: Any, finisher: Finisher, timeout: float
) -> tuple[str, dict[str, Any] | None, APIError | None]:
    """Run ``job`` on ``engine`` and build its result: its final (status, result, error), for ``Job.finish``."""
    from api.generation import as_api_error
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
        return "failed", None, as_api_error(exc, engine, timeout)
    except Exception:
        logger.exception("job %s (request %s) failed", job.id, generation.request_id)
        return "failed", None, internal_error(generation.request_id)
    return "succeeded", answer, None


def too_many_jobs(where: str, held: int, waits: list[float]) -> APIError:
    """The 503 for a store of ``held`` jobs none of which may go; ``waits``: the finished ones' grace left."""
    unfinished = held - len(waits)
    message = f"The {where} holds {held} jobs, its limit: {unfinished} unfinished"
    if waits:
        message += f", {len(waits)} finished within their --job-grace"
    return APIError(
        503,
        message + ". Retry later.",
        "overloaded_error",
        code="too_many_jobs",
        headers={"Retry-After": str(math.ceil(waits[0])) if waits else "1"},
    )
