"""The job service: generations that run on their own, watched and fetched by id, in a store that may outlive the
server (``--job-store``).

A durable queue, not HTTP: the routes (``api/routes/jobs.py``) call it, and it imports nothing from ``api/``. It sits
above the engine, which runs each job's generation. The stores: ``memory.JobStore`` (this process only:
``--job-store memory``), and ``durable.DurableJobs`` (the job service over a backend: ``sqlite.SQLiteBackend`` for one
machine, the default, ``jobs.db`` in the data directory; ``redis_store.RedisBackend`` for several servers; leases,
reaping, fenced ends), whose records are ``records``'. A job and its events are ``job``'s; the service's own failures
``errors``'.

Both stores answer the same calls: ``start``, ``describe``, ``stop``, ``follow``, ``open``, ``close``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jobs.errors import FailureOf, StoreRefused, StoreUnavailable, TooManyJobs
from jobs.job import KEEP_ALIVE_S

__all__ = ["KEEP_ALIVE_S", "StoreRefused", "StoreUnavailable", "TooManyJobs", "check_job_store", "make_job_store"]


def check_job_store(url: str) -> None:
    """Check at start-up, before the model loads, that the store ``url`` names can work: a SQLite file is opened, its
    table made or checked, and it must be writable (``ValueError`` says why). Redis is not: one that is away now may
    be back when needed, and is answered 503 meanwhile."""
    if url.startswith("sqlite:///"):
        from jobs.sqlite import check_store

        check_store(url)


def make_job_store(
    settings: Any,
    finisher_for: Callable[[dict[str, Any]], Any],
    engine_of: Callable[[], Any],
    failure_of: FailureOf,
) -> Any:
    """The job store ``settings.job_store`` names. ``finisher_for(context)`` builds a job's answer again from its
    record (a job run again, maybe on another server); ``engine_of()`` is this server's engine (None while loading);
    ``failure_of`` describes a failed run to the job's clients."""
    from jobs.memory import JobStore

    url = settings.job_store
    if url == "memory":
        return JobStore(settings.max_jobs, settings.job_ttl, settings.job_grace, failure_of=failure_of)
    from jobs.durable import DurableJobs

    if url.startswith("sqlite:///"):
        from jobs.sqlite import SQLiteBackend

        backend: Any = SQLiteBackend(url)
    else:
        from jobs.redis_store import RedisBackend

        backend = RedisBackend(url)
    return DurableJobs(backend, settings, finisher_for, engine_of, failure_of)
