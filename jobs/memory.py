"""The jobs of one server, in its memory (``--job-store memory``): bounded, with expiry and a grace.

The store is bounded (``--max-jobs``): when it is full, the oldest job that may go makes room; when none may, a new
one is refused (``TooManyJobs``, answered 503 ``too_many_jobs``). A succeeded or failed job may go once its
``--job-grace`` has passed since it ended, so its client can fetch the outcome whatever others do: otherwise anyone
could evict other users' results at once with pairs of POST and DELETE. A cancelled job may go at once (its end was
the answer to the DELETE, and there is nothing to fetch), so that churn evicts only itself. Finished jobs expire
``--job-ttl`` seconds after they end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from jobs.errors import FailureOf, TooManyJobs
from jobs.job import Finisher, Job, follow_job, run_outcome

logger = logging.getLogger(__name__)

__all__ = ["JobStore"]


class JobStore:
    """The jobs by id: bounded (``max_jobs``), finished ones expire after ``ttl`` seconds (0: never) and are kept at
    least ``grace`` seconds (cancelled ones excepted) however full the store is. ``failure_of`` describes a failed
    run (``jobs.errors.FailureOf``)."""

    def __init__(self, max_jobs: int, ttl: float, grace: float = 0.0, *, failure_of: FailureOf) -> None:
        self.max_jobs = max_jobs
        self.failure_of = failure_of
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
                raise TooManyJobs("server", len(self._jobs), sorted(w for w in waits.values() if w is not None))
            del self._jobs[oldest]

    async def start(self, generation: Any, engine: Any, finisher: Finisher, context: Any = None) -> Job:
        """Create a job and submit it to ``engine``; raise ``TooManyJobs`` if the store is full, and the engine's
        refusal (as ``failure_of`` describes it) if it cannot be admitted.

        ``context`` (what a durable store keeps to build the finisher again) is not needed here. Admission without
        a race: the job's task calls ``engine.submit`` as its first step, and ``submit`` decides
        (a slot, a place in the queue, or Overloaded/NotReady) before it first suspends. Tasks start in the order
        they were scheduled, so after one ``sleep(0)`` here the job's task has already been admitted or refused:
        a refusal is answered now and no job exists; an admitted job holds its place.
        """
        self._make_room()
        job = Job(generation)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, engine, finisher), name=f"job-{job.id[:8]}")
        await asyncio.sleep(0)
        if job.task.done() and job.status == "failed" and job.error is not None:
            del self._jobs[job.id]
            raise job.error
        if job.position is None:
            # Not queued (that is announced at once): it took a free slot, and its thread is starting.
            job.status = "running"
        logger.info("request %s (job %s): %s", generation.request_id, job.id, generation.summary())
        return job

    async def _run(self, job: Job, engine: Any, finisher: Finisher) -> None:
        job.finish(*await run_outcome(job, engine, finisher, self.failure_of))

    def cancel(self, job: Job) -> None:
        """Ask the job to stop: a queued job never runs, a running one stops at its next step."""
        if not job.finished:
            job.gone.set()

    # -- what the routes ask (the same for every store: jobs/durable.py) ---------------------------------

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
        return None if job is None else follow_job(job, job.subscribe())

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
