"""The job service's settings (``POST /api/jobs``): how many jobs are kept and for how long, where (``--job-store``),
and the leases of a durable store. ``Settings`` inherits them; they are flags and SERVER_* variables like every other
option, validated before the model loads."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

__all__ = ["JobSettings"]


class JobSettings(BaseSettings):
    """The jobs' options (docs/operations/durable-jobs.md)."""

    max_jobs: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="jobs kept (POST /api/jobs); the oldest that may go (see --job-grace) go first; else 503",
    )
    job_ttl: float = Field(3600.0, ge=0, description="seconds a finished job is kept (0: until --max-jobs evicts it)")
    job_grace: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="seconds a succeeded or failed job is kept however full the store, so its client can fetch it; "
        "a full store of such jobs (and unfinished ones) refuses new jobs 503 (0: none)",
    )
    job_store: str | None = Field(
        None,
        description="where jobs are kept: sqlite:///relative.db or sqlite:////absolute.db (a file: jobs survive a "
        "restart; it is opened and checked at start), redis://host:port/db (shared by every server on it), or memory "
        "(this process only: a restart loses them) (default: a SQLite file, jobs.db in the data directory)",
    )
    job_lease: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="sqlite/redis stores: seconds a server's claim on a job lasts unless renewed (every third of "
        "it); a job whose server stopped renewing is run again after this",
    )
    job_max_attempts: int = Field(
        3, ge=1, le=100, description="sqlite/redis stores: runs a job gets before a server loss fails it"
    )

    @field_validator("job_store")
    @classmethod
    def _check_job_store(cls, value: str | None) -> str | None:
        if value is None or value == "memory" or re.match(r"^rediss?://", value):
            return value
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            parent = Path(value.removeprefix("sqlite:///")).expanduser().resolve().parent
            if not parent.is_dir():
                raise ValueError(f"the SQLite file's directory {parent} does not exist")
            return value
        raise ValueError(
            "job_store must be memory, sqlite:///path.db (sqlite:////absolute/path.db) or redis://host:port/db"
        )
