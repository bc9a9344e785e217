"""Durable job stores (``--job-store``): SQLite for one machine, Redis for several servers; ``api.jobs.JobStore``
(memory) stays the default. ``make_job_store`` picks one from the settings; ``durable.DurableJobs`` is the job
service over a backend (``sqlite.SQLiteBackend``, ``redis_store.RedisBackend``), whose records are ``records``'."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["make_job_store"]


def make_job_store(settings: Any, finisher_for: Callable[[dict[str, Any]], Any], engine_of: Callable[[], Any]) -> Any:
    """The job store ``settings.job_store`` names. ``finisher_for(context)`` builds a job's answer again from its
    record (a job run again, maybe on another server); ``engine_of()`` is this server's engine (None while loading)."""
    from api.jobs import JobStore

    url = settings.job_store
    if url == "memory":
        return JobStore(settings.max_jobs, settings.job_ttl, settings.job_grace)
    from api.jobstores.durable import DurableJobs

    if url.startswith("sqlite:///"):
        from api.jobstores.sqlite import SQLiteBackend

        backend: Any = SQLiteBackend(url)
    else:
        from api.jobstores.redis_store import RedisBackend

        backend = RedisBackend(url)
    return DurableJobs(backend, settings, finisher_for, engine_of)
