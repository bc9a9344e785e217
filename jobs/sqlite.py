"""The SQLite job store (``--job-store sqlite:///jobs.db``): one file on one machine, which outlives the server.

The standard library's ``sqlite3``, in WAL mode: a committed write survives the process being killed (SIGKILL; only
a power loss may take the last commits with ``synchronous=NORMAL``). Every call runs in a thread (off the event
loop), one at a time on one connection; the writes that must be atomic (insert with eviction, claim, the fenced
finish) are single ``BEGIN IMMEDIATE`` transactions, so several processes on one file stay consistent too (they
follow each other's jobs by polling: there is no event stream, and a cancel reaches another process at its renewal).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.errors import StoreFull
from jobs.records import FIELDS, REQUEUED, attempts_error

__all__ = ["SQLiteBackend"]

_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "json": "TEXT"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS jobs ("
    + ", ".join(f"{name} {_TYPES[kind]}" + (" PRIMARY KEY" if name == "id" else "") for name, kind in FIELDS.items())
    + ")"
)
_UNFINISHED = "status NOT IN ('succeeded', 'failed', 'cancelled')"  # records.FINAL


def _row(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if FIELDS[k] == "json" and v is not None else v for k, v in fields.items()}


def _record(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    data = dict(row)  # a Row is a mapping of the columns
    return {k: json.loads(v) if FIELDS[k] == "json" and v is not None else v for k, v in data.items()}


class SQLiteBackend:
    def __init__(self, url: str) -> None:
        self.path = Path(url.removeprefix("sqlite:///")).expanduser()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq)")
        self._lock = threading.Lock()

    async def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        def locked() -> Any:
            with self._lock:
                return work(self._db)

        return await asyncio.to_thread(locked)

    async def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        def atomic(db: sqlite3.Connection) -> Any:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._run(atomic)

    @staticmethod
    def _update(db: sqlite3.Connection, job_id: str, fields: dict[str, Any], where: str = "", *args: Any) -> int:
        row = _row(fields)
        sets = ", ".join(f"{k} = ?" for k in row)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?" + (f" AND {where}" if where else "")
        return db.execute(sql, (*row.values(), job_id, *args)).rowcount

    # -- records --------------------------------------------------------------------------------------------------

    async def insert(self, record: dict[str, Any], max_jobs: int, grace: float, ttl: float, now: float) -> None:
        def insert(db: sqlite3.Connection) -> None:
            self._prune(db, now, ttl)
            (held,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            while held >= max_jobs:
                victim = db.execute(
                    "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND (status = 'cancelled' OR "
                    "finished_at + ? <= ?) ORDER BY seq LIMIT 1",
                    (grace, now),
                ).fetchone()
                if victim is None:
                    waits = db.execute(
                        "SELECT finished_at + ? - ? FROM jobs WHERE finished_at IS NOT NULL ORDER BY 1", (grace, now)
                    ).fetchall()
                    raise StoreFull(held, [max(0.0, w) for (w,) in waits])
                db.execute("DELETE FROM jobs WHERE id = ?", (victim[0],))
                held -= 1
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            row = _row({**record, "seq": seq})
            db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

        await self._transaction(insert)

    async def load(self, job_id: str) -> dict[str, Any] | None:
        return await self._run(lambda db: _record(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()))

    async def snapshot(self, job_id: str) -> tuple[dict[str, Any] | None, None]:
        return await self.load(job_id), None  # no event stream: followers poll

    async def delete(self, job_id: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    async def progress(
        self, job_id: str, owner: str, attempt: int, fields: dict[str, Any], event: tuple[str, Any]
    ) -> None:
        where = f"owner = ? AND attempt = ? AND {_UNFINISHED}"
        await self._run(lambda db: self._update(db, job_id, fields, where, owner, attempt))

    async def announce(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        """Events live in the record here: nothing more to write."""

    async def finish(self, job_id: str, owner: str, attempt: int, fields: dict[str, Any], done: dict[str, Any]) -> bool:
        where = f"owner = ? AND attempt = ? AND {_UNFINISHED}"
        return await self._transaction(lambda db: self._update(db, job_id, fields, where, owner, attempt) == 1)

    async def release(self, job_id: str, owner: str, attempt: int, fields: dict[str, Any]) -> None:
        where = f"owner = ? AND attempt = ? AND {_UNFINISHED}"
        await self._transaction(lambda db: self._update(db, job_id, fields, where, owner, attempt))

    async def request_cancel(self, job_id: str) -> dict[str, Any] | None:
        def cancel(db: sqlite3.Connection) -> dict[str, Any] | None:
            self._update(db, job_id, {"cancel": 1}, _UNFINISHED)
            return _record(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

        return await self._transaction(cancel)

    # -- leases ---------------------------------------------------------------------------------------------------

    async def renew(self, owner: str, held: dict[str, int], lease_until: float) -> dict[str, str]:
        def renew(db: sqlite3.Connection) -> dict[str, str]:
            codes = {}
            for job_id, attempt in held.items():
                where = f"owner = ? AND attempt = ? AND {_UNFINISHED}"
                if not self._update(db, job_id, {"lease_until": lease_until}, where, owner, attempt):
                    codes[job_id] = "lost"
                    continue
                (cancel,) = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
                codes[job_id] = "cancel" if cancel else "ok"
            return codes

        return await self._transaction(renew)

    async def reap(self, now: float, max_attempts: int) -> list[dict[str, Any]]:
        """Jobs whose owner's lease ran out: back to wait for a server, or failed at their last attempt."""

        def reap(db: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = f"SELECT * FROM jobs WHERE owner != '' AND lease_until < ? AND {_UNFINISHED} ORDER BY seq"
            reaped = [_record(row) for row in db.execute(sql, (now,)).fetchall()]
            for record in reaped:
                assert record is not None
                if record["attempt"] >= max_attempts:
                    ended = {"status": "failed", "owner": "", "finished_at": now, "position": None, "preview": None}
                    record.update(ended, error=attempts_error(record["attempt"]))
                    self._update(db, record["id"], {**ended, "error": record["error"]})
                else:
                    record.update(REQUEUED)
                    self._update(db, record["id"], REQUEUED)
            return [r for r in reaped if r is not None]

        return await self._transaction(reap)

    async def claim_next(self, owner: str, lease_until: float) -> dict[str, Any] | None:
        def claim(db: sqlite3.Connection) -> dict[str, Any] | None:
            sql = f"SELECT * FROM jobs WHERE owner = '' AND {_UNFINISHED} ORDER BY seq LIMIT 1"
            record = _record(db.execute(sql).fetchone())
            if record is not None:
                record.update(owner=owner, attempt=record["attempt"] + 1, lease_until=lease_until)
                self._update(db, record["id"], {k: record[k] for k in ("owner", "attempt", "lease_until")})
            return record

        return await self._transaction(claim)

    async def prune(self, now: float, ttl: float) -> None:
        await self._transaction(lambda db: self._prune(db, now, ttl))

    @staticmethod
    def _prune(db: sqlite3.Connection, now: float, ttl: float) -> None:
        if ttl > 0:
            db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at + ? <= ?", (ttl, now))

    async def close(self) -> None:
        await self._run(lambda db: db.close())
