"""Jobs in a durable store (SQLite, Redis): one job service across every server that shares the store.

Each server process has an id (``server_id``). The server that takes a ``POST`` writes the job's record (bounded by
``--max-jobs`` for the store as a whole, in one atomic step with the eviction) already claimed by itself, then
submits it to its own engine, so admission is as honest as in memory: a full engine answers 503 ``queue_full`` with
``Retry-After`` and the record is removed. While a server holds a job (queued in its engine or running) it renews the
job's lease every third of ``--job-lease``; the same tick re-queues jobs whose lease ran out (their server died:
SIGKILL, a crash, a lost node), counting an attempt, fails those that reached ``--job-max-attempts``, and claims
waiting jobs, oldest first, while its engine has a free place. A server that stops normally hands its unfinished jobs
back at once (the drain's ``draining`` outcome is not an end).

A run ends by one conditional write: the record must still be owned by this server, at this attempt, and not
finished. A server that lost its lease (it was paused past it, and the job went to another) stops the job at its next
step and its outcome is dropped; so a job is never finished twice, and two runs never both complete it.

The server running a job answers ``GET``, ``/events`` and ``DELETE`` from its live state (as the memory store does);
any other server answers from the record: its events come from the store (Redis: a stream per job; SQLite: by
polling the record), replayed then followed, through the same bounded ``Subscriber`` as local ones. A ``DELETE`` on
any server sets the record's ``cancel`` flag and tells the owner (Redis: pub/sub; also seen at its next renewal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from jobs.errors import FailureOf, StoreFull, StoreUnavailable, TooManyJobs, failure_body
from jobs.follow import follow_local, follow_store
from jobs.job import KEEP_ALIVE_S, Finisher, Job, Subscriber, run_outcome
from jobs.records import FINAL, REQUEUED, body_of, generation_of, state_of

logger = logging.getLogger(__name__)

__all__ = ["DurableJobs", "StoredJob"]

RETRY_S = 1.0  # a write the store refused (unreachable) is tried again this often


class StoredJob(Job):
    """A job this server runs: ``jobs.job.Job`` whose events are also written to the store (through a bounded queue,
    so a slow store loses intermediate steps, never holds the job)."""

    def __init__(self, generation: Any, record: dict[str, Any] | None = None) -> None:
        super().__init__(generation)
        if record is not None:  # a run of a job made earlier (here or elsewhere)
            self.id, self.created_at = record["id"], record["created_at"]
        self.attempt = 1 if record is None else record["attempt"]
        self.mirror = Subscriber()
        self.lost = False  # the lease went to another server: this run's outcome is not the job's
        self.admitting = True  # until the engine has said whether it takes the job
        self.refused: Any = None  # the engine's refusal (as ``failure_of`` describes it), answered to the POST

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        super()._publish(name, data)
        if name != "done":  # the end is written by the run's final, conditional write
            self.mirror.put(name, data)

    def progress_fields(self) -> dict[str, Any]:
        at = None if self.last_step_at is None else time.time() - (time.monotonic() - self.last_step_at)
        return {
            "status": self.status,
            "position": self.position if self.status == "queued" else None,
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "last_step_at": at,
            "preview": self.last_preview,
        }

    def hand_over(self) -> None:
        """Tell local followers to go on from the store: this server no longer runs the job."""
        self._publish("moved", {})
        self.subscribers.clear()


class DurableJobs:
    """The job service over a store backend (``jobs.sqlite`` or ``jobs.redis_store``). ``settings``: the store's
    options (``max_jobs``, ``job_ttl``, ``job_grace``, ``job_lease``, ``job_max_attempts``); ``finisher_for(context)``
    builds a job's answer from its record; ``engine_of()`` is this server's engine (None while loading);
    ``failure_of`` describes a failed run."""

    def __init__(
        self,
        backend: Any,
        settings: Any,
        finisher_for: Callable[[dict[str, Any]], Finisher],
        engine_of: Any,
        failure_of: FailureOf,
    ):
        self.backend = backend
        self.failure_of = failure_of
        self.max_jobs, self.ttl, self.grace = settings.max_jobs, settings.job_ttl, settings.job_grace
        self.lease, self.max_attempts = settings.job_lease, settings.job_max_attempts
        self.finisher_for, self.engine_of = finisher_for, engine_of
        self.server_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.local: dict[str, StoredJob] = {}  # the jobs this server runs (queued in its engine, or running)
        self._tasks: list[asyncio.Task[None]] = []
        self._down = False  # the store was unreachable at the last tick (logged once per outage)
        self._closing = False

    @property
    def heartbeat(self) -> float:
        return self.lease / 3

    # -- what the routes ask --------------------------------------------------------------------------------

    async def start(self, generation: Any, engine: Any, finisher: Finisher, context: Any = None) -> StoredJob:
        """Write the job's record (claimed by this server), then submit it to this server's engine: as
        ``jobs.memory.JobStore.start``, a refusal is raised now and leaves no job; a store that cannot be reached
        raises ``StoreUnavailable``."""
        job = StoredJob(generation)
        now = time.time()
        record = {
            **{"id": job.id, "created_at": job.created_at, "body": body_of(generation), "context": context},
            **{"status": "queued", "owner": self.server_id, "attempt": 1, "lease_until": now + self.lease},
            **{"cancel": 0, "step": 0, "finished_at": None, "result": None, "error": None},
        }
        try:
            await self.backend.insert(record, self.max_jobs, self.grace, self.ttl, now)
        except StoreFull as full:
            raise TooManyJobs("job store", full.held, full.waits) from None
        if not await self._launch(job, engine, finisher):
            with contextlib.suppress(StoreUnavailable):
                await self.backend.delete(job.id)
            raise job.refused
        logger.info("request %s (job %s): %s", generation.request_id, job.id, generation.summary())
        return job

    async def _launch(self, job: StoredJob, engine: Any, finisher: Finisher) -> bool:
        """Start ``job``'s run; False if the engine refused it (``job.refused``). See ``jobs.memory.JobStore.start``:
        after one ``sleep(0)`` the engine has admitted or refused it."""
        self.local[job.id] = job
        job.task = asyncio.create_task(self._run(job, engine, finisher), name=f"job-{job.id[:8]}")
        await asyncio.sleep(0)
        job.admitting = False
        if job.refused is not None:
            self.local.pop(job.id, None)
            return False
        if job.position is None:
            job.status = "running"  # not queued: it took a free slot, and its thread is starting
        return True

    async def describe(self, job_id: str) -> dict[str, Any] | None:
        job = self.local.get(job_id)
        if job is not None:
            return job.to_dict()
        record = await self._load(job_id)
        return None if record is None else state_of(record)

    async def _load(self, job_id: str) -> dict[str, Any] | None:
        """The job's record, or None when there is none or it has expired (``--job-ttl``)."""
        record = await self.backend.load(job_id)
        if record is None or self._expired(record, time.time()):
            return None
        return record

    def _expired(self, record: dict[str, Any], now: float) -> bool:
        finished = record.get("finished_at")
        return self.ttl > 0 and finished is not None and now - finished >= self.ttl

    async def stop(self, job_id: str) -> dict[str, Any] | None:
        """Cancel the job wherever it runs; answer its state once it has ended (10 s at most)."""
        job = self.local.get(job_id)
        if job is not None:
            if not job.finished:
                job.gone.set()
            if job.task is not None and not job.task.done():
                await asyncio.wait({job.task}, timeout=10)
            return await self.describe(job_id)
        record = await self.backend.request_cancel(job_id)
        if record is None or self._expired(record, time.time()):
            return None
        if record["status"] not in FINAL and not record["owner"]:  # waiting for a server: it ends here and now
            await self._finish(record, "", "cancelled", None, None)
        deadline = time.monotonic() + 10
        while (state := await self.describe(job_id)) is not None and state["status"] not in FINAL:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return state

    async def follow(self, job_id: str) -> AsyncIterator[tuple[str, dict[str, Any]] | None] | None:
        """The job's events (as ``jobs.memory.JobStore.follow``): live from this server's run, else from the store."""
        job = self.local.get(job_id)
        if job is not None:
            return follow_local(self.backend, job, job.subscribe())
        record = await self._load(job_id)
        return None if record is None else follow_store(self.backend, job_id)

    # -- runs ---------------------------------------------------------------------------------------------------

    async def _run(self, job: StoredJob, engine: Any, finisher: Finisher) -> None:
        writer = asyncio.create_task(self._write_progress(job), name=f"job-progress-{job.id[:8]}")
        try:
            status, result, error = await run_outcome(job, engine, finisher, self.failure_of)
            if job.admitting and status == "failed":  # refused at admission: answered to the POST, no job
                job.refused = error
                return
        finally:
            # The writer ends after the events before this one (a cancel could be lost in Subscriber.get's wait_for).
            job.mirror.put("end", {})
            if (await asyncio.wait({writer}, timeout=15))[1]:
                writer.cancel()
        if not job.lost and error is not None and error.code == "draining":
            await self._retry(lambda: self._release(job))
            logger.info("job %s: handed back to the store (this server is stopping)", job.id)
            job.lost = True
        if not job.lost:
            job.lost = not await self._retry(
                lambda: self._finish(self._owned(job), self.server_id, status, result, error)
            )
        self.local.pop(job.id, None)
        if job.lost:
            job.hand_over()
        else:
            job.finish(status, result, error)

    def _owned(self, job: StoredJob) -> dict[str, Any]:
        body = {"num_inference_steps": job.generation.num_inference_steps, "seed": job.generation.seed}
        return {
            "id": job.id,
            "attempt": job.attempt,
            "created_at": job.created_at,
            "body": body,
            **job.progress_fields(),
        }

    async def _write_progress(self, job: StoredJob) -> None:
        """Write the job's events to the store in order; a store that is slow or away loses intermediate ones."""
        while True:
            event = await job.mirror.get(KEEP_ALIVE_S)
            if event is None:
                continue
            if event[0] == "end":
                return
            # A store away: the state reaches it with the next event, or the end.
            with contextlib.suppress(StoreUnavailable):
                await self.backend.progress(job.id, self.server_id, job.attempt, job.progress_fields(), event)

    async def _finish(self, record: dict[str, Any], owner: str, status: str, result: Any, error: Any) -> bool:
        """The one conditional write that ends a job (owner and attempt must match, and it must be unfinished)."""
        error_body = None if error is None else failure_body(error)
        now = time.time()
        fields = {"status": status, "owner": "", "finished_at": now, "result": result, "error": error_body}
        fields.update({"position": None, "preview": None, "step": record.get("step") or 0})
        done = state_of({**record, **fields}, now)
        return await self.backend.finish(record["id"], owner, record["attempt"], fields, done)

    async def _retry(self, write: Callable[[], Any]) -> Any:
        """``write()`` until the store takes it; gives up (None) only when the server is stopping."""
        while True:
            try:
                return await write()
            except StoreUnavailable as exc:
                if self._closing:
                    logger.warning("job store unavailable at shutdown (%s): the job is left to its lease", exc)
                    return None
                await asyncio.sleep(RETRY_S)

    # -- the tick: renew, reap, prune, claim ------------------------------------------------------------------

    def open(self) -> None:
        self._tasks.append(asyncio.create_task(self._tend(), name="job-store-tick"))
        watch = getattr(self.backend, "watch_cancels", None)
        if watch is not None:
            self._tasks.append(asyncio.create_task(watch(self._cancelled), name="job-store-cancels"))

    def _cancelled(self, job_id: str) -> None:
        job = self.local.get(job_id)
        if job is not None and not job.finished:
            job.gone.set()

    async def _tend(self) -> None:
        while True:
            try:
                await self.tick()
                if self._down:
                    logger.info("job store reachable again")
                self._down = False
            except StoreUnavailable as exc:
                if not self._down:
                    logger.warning("job store unavailable (%s); retrying every %gs", exc, self.heartbeat)
                self._down = True
            await asyncio.sleep(self.heartbeat)

    async def tick(self) -> None:
        now = time.time()
        held = {job_id: job.attempt for job_id, job in self.local.items()}
        if held:
            for job_id, code in (await self.backend.renew(self.server_id, held, now + self.lease)).items():
                job = self.local.get(job_id)
                if job is not None and code != "ok" and not job.finished:
                    job.lost = job.lost or code == "lost"
                    job.gone.set()
        for record in await self.backend.reap(now, self.max_attempts):
            logger.warning(
                "job %s: its server stopped during run %d of %d", record["id"], record["attempt"], self.max_attempts
            )
            if record["status"] in FINAL:
                await self.backend.announce(record["id"], "done", state_of(record, now))
        await self.backend.prune(now, self.ttl)
        await self._claim()

    async def _claim(self) -> None:
        """Take waiting jobs, oldest first, while this server's engine has a free place for them."""
        engine = self.engine_of()
        while not self._closing and engine is not None and engine.ready_reason is None:
            if engine.active + engine.queued >= engine.max_concurrency + engine.max_queue:
                return
            record = await self.backend.claim_next(self.server_id, time.time() + self.lease)
            if record is None:
                return
            job = StoredJob(generation_of(record["body"]), record)
            logger.info("job %s: run %d on this server", job.id, job.attempt)
            if not await self._launch(job, engine, self.finisher_for(record["context"])):
                await self._release(job)
                return

    async def _release(self, job: StoredJob) -> None:
        """Give ``job`` back to the store, its run not counted: this server stopped it (a drain) or could not take
        it (its engine filled meanwhile)."""
        await self.backend.release(job.id, self.server_id, job.attempt, {**REQUEUED, "attempt": job.attempt - 1})

    async def close(self, timeout: float) -> None:
        """As ``jobs.memory.JobStore.close``: the engine has drained; the runs end (written, or handed back)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        tasks = {job.task for job in self.local.values() if job.task is not None and not job.task.done()}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
        await self.backend.close()
