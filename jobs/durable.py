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

No store error strands a job. A store away or refusing writes (``StoreUnavailable``, ``StoreRefused``) has the end
written again until it takes it; meanwhile the job stays unfinished (``eta_s`` null: no steps are left) and its lease
is renewed as the store allows. An error no retry mends fails the job (``job_store_error``) with a reason its
followers see. The tick survives every error: each of its steps is tried at every tick, its trouble logged once per
kind and interval (``jobs.trouble``).

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

from jobs.errors import Failure, FailureOf, StoreFailure, StoreFull, StoreUnavailable, TooManyJobs, failure_body
from jobs.follow import follow_local, follow_store
from jobs.job import KEEP_ALIVE_S, Finisher, run_outcome
from jobs.records import FINAL, REQUEUED, body_of, generation_of, state_of
from jobs.stored import StoredJob
from jobs.trouble import Trouble, kind_of

logger = logging.getLogger(__name__)

__all__ = ["DurableJobs", "StoredJob"]

RETRY_S = 1.0  # a run's end the store did not take (away, or refusing writes) is tried again this often
Outcome = tuple[str, dict[str, Any] | None, Failure | None]  # (status, result, error): how a run ended


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
        self.trouble = Trouble(logger, "the tick")
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
        now = job.renewed_at = time.time()
        record = {
            **{"id": job.id, "created_at": job.created_at, "body": body_of(generation), "context": context},
            **{"status": "queued", "owner": self.server_id, "attempt": 1, "lease_until": now + self.lease},
            "renewed_at": now,
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
        stale = self.local.get(job.id)
        if stale is not None:  # an earlier run here lost its lease (the store refused its renewals) and is rerun
            stale.lost = True
            stale.gone.set()
        self.local[job.id] = job
        job.task = asyncio.create_task(self._run(job, engine, finisher), name=f"job-{job.id[:8]}")
        await asyncio.sleep(0)
        job.admitting = False
        if job.refused is not None:
            if self.local.get(job.id) is job:
                del self.local[job.id]
            return False
        if job.position is None:
            job.status = "running"  # not queued: it took a free slot, and its thread is starting
        return True

    async def describe(self, job_id: str) -> dict[str, Any] | None:
        job = self.local.get(job_id)
        if job is not None and job.ending:
            # Its end is being written: once the store has it, answer it as every other server does.
            with contextlib.suppress(StoreUnavailable):
                record = await self._load(job_id)
                if record is not None and record["status"] in FINAL:
                    return state_of(record)
        if job is not None:
            return job.to_dict()
        record = await self._load(job_id)
        # Not run here: a runner that has missed a renewal (they come every third of the lease) has stopped.
        return None if record is None else state_of(record, stale_after=self.lease / 2)

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
            await self._finish(record, "cancelled", None, None)
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
        outcome = None
        try:
            outcome = await self._outcome(job, engine, finisher)
            if outcome is not None:
                outcome = await self._end(job, *outcome)
        finally:
            # Whatever happened (the end written, the job handed back, the server stopping, a bug): this server stops
            # renewing the job, and its followers are told its end, or go on from the store.
            if self.local.get(job.id) is job:  # not a later run of the same job, here
                del self.local[job.id]
            if outcome is not None and not job.lost:
                job.finish(*outcome)
            elif job.refused is None:
                job.hand_over()

    async def _outcome(self, job: StoredJob, engine: Any, finisher: Finisher) -> Outcome | None:
        """The run's outcome, its progress written meanwhile; None when it is not the job's end (refused at
        admission, or handed back by a drain)."""
        writer = asyncio.create_task(self._write_progress(job), name=f"job-progress-{job.id[:8]}")
        try:
            status, result, error = await run_outcome(job, engine, finisher, self.failure_of)
            if job.admitting and status == "failed":  # refused at admission: answered to the POST, no job
                job.refused = error
                return None
        finally:
            # The writer ends after the events before this one (a cancel could be lost in Subscriber.get's wait_for).
            job.mirror.put("end", {})
            if (await asyncio.wait({writer}, timeout=15))[1]:
                writer.cancel()
        job.ending = True
        if not job.lost and error is not None and error.code == "draining":
            try:
                await self._retry(job, "hand-back", lambda: self._release(job))
                logger.info("job %s: handed back to the store (this server is stopping)", job.id)
            except Exception:
                logger.exception("job %s: could not be handed back: left to its lease", job.id)
            job.lost = True
        return None if job.lost else (status, result, error)

    async def _end(self, job: StoredJob, status: str, result: Any, error: Failure | None) -> Outcome:
        """Write the run's end. An error no retry mends (a result the store cannot take, say) fails the job with a
        reason its followers see; if even that cannot be written, the job is left to its lease (the store decides:
        another run, or a failure after its attempts)."""
        for outcome in ((status, result, error), ("failed", None, StoreFailure())):
            try:
                written = await self._retry(job, "end", lambda o=outcome: self._finish(self._owned(job), *o))
            except Exception:
                logger.exception("job %s: its end (%s) could not be written", job.id, outcome[0])
                continue
            job.lost = not written
            return outcome
        job.lost = True
        return "failed", None, StoreFailure()

    def _owned(self, job: StoredJob) -> dict[str, Any]:
        generation = job.generation  # what the end's state reads of the body: its steps (as its task counts them), seed
        body = {"num_inference_steps": generation.num_inference_steps, "seed": generation.seed}
        body.update(task=generation.task, strength=generation.strength)
        return {
            "owner": self.server_id,
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
            try:
                await self.backend.progress(job.id, self.server_id, job.attempt, job.progress_fields(), event)
            except StoreUnavailable:
                pass  # a store away or refusing writes: the state reaches it with the next event, or the end
            except Exception:  # a bug must not stop the writer: the run, and its end, go on
                logger.exception("job %s: its progress could not be written", job.id)

    async def _finish(self, record: dict[str, Any], status: str, result: Any, error: Any) -> bool:
        """The one conditional write that ends a job (owner and attempt must match, and it must be unfinished)."""
        error_body = None if error is None else failure_body(error)
        now = time.time()
        fields = {"status": status, "owner": "", "finished_at": now, "result": result, "error": error_body}
        fields.update({"position": None, "preview": None, "step": record.get("step") or 0})
        done = state_of({**record, **fields}, now)
        return await self.backend.finish(record["id"], record["owner"], record["attempt"], fields, done)

    async def _retry(self, job: StoredJob, what: str, write: Callable[[], Any]) -> Any:
        """``write()`` (``job``'s ``what``) until the store takes it, while it is away or refuses writes (said once per
        kind); gives up (None) only when the server is stopping. Any other error is raised."""
        told = ""
        while True:
            try:
                written = await write()
            except StoreUnavailable as exc:
                kind = kind_of(exc)
                if self._closing:
                    logger.warning("job %s: its %s not written at shutdown (%s): left to its lease", job.id, what, exc)
                    return None
                if kind != told:
                    logger.warning("job %s: its %s not written (%s); retrying every %gs", job.id, what, exc, RETRY_S)
                    told = kind
                await asyncio.sleep(RETRY_S)
                continue
            if told:
                logger.info("job %s: its %s is written", job.id, what)
            return written

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
            except Exception as exc:  # noqa: BLE001 - a backstop: the tick must never die
                self.trouble.report(exc, "tick", self.heartbeat)
            await asyncio.sleep(self.heartbeat)

    async def tick(self) -> None:
        """Renew this server's leases, reap expired ones, prune expired jobs, claim waiting ones. A step that fails is
        reported (once per kind and interval) and the next one goes on, unless the store cannot be reached: then the
        others would only wait for the same timeout."""
        now, failed = time.time(), False
        for step in (self._renew, self._reap, self._prune, self._claim):
            try:
                await step(now)
            except Exception as exc:  # noqa: BLE001 - one step's trouble must stop neither the others nor the tick
                failed = True
                self.trouble.report(exc, step.__name__.strip("_"), self.heartbeat)
                if kind_of(exc) == "unavailable":
                    return
        if not failed:
            self.trouble.passed()

    async def _renew(self, now: float) -> None:
        held = {job_id: job.attempt for job_id, job in self.local.items()}
        if not held:
            return
        for job_id, code in (await self.backend.renew(self.server_id, held, now + self.lease, now)).items():
            job = self.local.get(job_id)
            if job is None:
                continue
            if code != "lost":
                job.renewed_at = now
            if code != "ok" and not job.finished:
                job.lost = job.lost or code == "lost"
                job.gone.set()

    async def _reap(self, now: float) -> None:
        for record in await self.backend.reap(now, self.max_attempts):
            logger.warning(
                "job %s: its server stopped during run %d of %d", record["id"], record["attempt"], self.max_attempts
            )
            if record["status"] in FINAL:
                # Its followers see the end anyway (a quiet stream is checked against the record): a store that
                # refuses this event only makes them wait for that check.
                with contextlib.suppress(StoreUnavailable):
                    await self.backend.announce(record["id"], "done", state_of(record, now))

    async def _prune(self, now: float) -> None:
        await self.backend.prune(now, self.ttl)

    async def _claim(self, now: float) -> None:
        """Take waiting jobs, oldest first, while this server's engine has a free place for them."""
        engine = self.engine_of()
        while not self._closing and engine is not None and engine.ready_reason is None:
            if engine.active + engine.queued >= engine.max_concurrency + engine.max_queue:
                return
            claimed_at = time.time()  # each claim its own: launching the one before took a moment
            record = await self.backend.claim_next(self.server_id, claimed_at + self.lease, claimed_at)
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
