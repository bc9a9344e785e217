"""The SQLite job store (``--job-store sqlite:///jobs.db``): one file on one machine, which outlives the server.

The standard library's ``sqlite3``, in WAL mode: a committed write survives the process being killed (SIGKILL; only
a power loss may take the last commits with ``synchronous=NORMAL``). Every call runs in a thread (off the event
loop), one at a time on one connection; the writes that must be atomic (insert with eviction, claim, the fenced
finish) are single ``BEGIN IMMEDIATE`` transactions, so several processes on one file stay consistent too (they
follow each other's jobs by polling: there is no event stream, and a cancel reaches another process at its renewal).

SQLite's errors are sorted for the job service: a busy or locked file is ``StoreUnavailable``; a full disk, a read-only
file, an I/O error or a damaged file is ``StoreRefused`` (both transient for a job: answered 503 and retried); the
rest (a bug) stays as it is. A failed write (even a failed ``COMMIT``) is rolled back, so the connection is never left
inside a transaction. The file is checked when it is opened (``check_store`` at start-up: an exit 2 that says why)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs.errors import StoreFull, StoreRefused, StoreUnavailable
from jobs.records import FIELDS, REQUEUED, attempts_error

__all__ = ["BadStore", "SQLiteBackend", "check_store"]

_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "json": "TEXT"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS jobs ("
    + ", ".join(f"{name} {_TYPES[kind]}" + (" PRIMARY KEY" if name == "id" else "") for name, kind in FIELDS.items())
    + ")"
)
_UNFINISHED = "status NOT IN ('succeeded', 'failed', 'cancelled')"  # records.FINAL
_LATER_COLUMNS = ("renewed_at",)  # added since the first stores were made: an older table gets them when opened
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_REFUSING = {  # the file answers, but takes no writes (a full disk, a read-only file or mount, a failing disk)
    *(sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN),
    *(sqlite3.SQLITE_PERM, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_NOLFS),
}


class BadStore(ValueError):
    """A file that cannot be a job store; the text says why (it follows ``--job-store URL:`` in the start's error)."""


def _code(exc: sqlite3.Error) -> int:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code, without the extended part


def _classified(exc: sqlite3.Error) -> Exception:
    """``exc`` as the job service knows it (its text is SQLite's own, which names no file)."""
    if _code(exc) in _BUSY:
        return StoreUnavailable(f"sqlite: {exc}")
    if _code(exc) in _REFUSING:
        return StoreRefused(f"sqlite: {exc}")
    return exc


def _why(exc: sqlite3.Error, path: Path) -> str:
    """Why the file at ``path`` cannot be a job store, from the error that opening it met."""
    code = _code(exc)
    if code == sqlite3.SQLITE_CANTOPEN and not path.exists():
        return f"cannot be created ({exc}): is its directory writable?"
    if code == sqlite3.SQLITE_CANTOPEN:
        return f"cannot be opened ({exc}): check its and its directory's permissions (SQLite adds -wal and -shm files)"
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        return f"is read-only ({exc}): the file, its directory or its mount must be writable"
    if code == sqlite3.SQLITE_NOTADB:
        return f"is not an SQLite database ({exc}): name a new file, or one this server made"
    if code == sqlite3.SQLITE_FULL:
        return f"cannot be written: the disk is full ({exc})"
    return f"cannot be used ({exc})"


def _make_table(db: sqlite3.Connection) -> None:
    """Make the jobs table, or check an existing one and add the columns it lacks of ``_LATER_COLUMNS``."""
    columns = {row[1]: str(row[2]).upper() for row in db.execute("PRAGMA table_info(jobs)")}
    if not columns:
        db.execute(_SCHEMA)
        return
    wrong = [name for name, kind in FIELDS.items() if columns.get(name, _TYPES[kind]) != _TYPES[kind]]
    missing = [name for name in FIELDS if name not in columns and name not in _LATER_COLUMNS]
    if wrong or missing:
        lacks = ", ".join(missing + [f"{name} as {_TYPES[FIELDS[name]]}" for name in wrong])
        raise BadStore(f"its jobs table is not a job store's (it lacks {lacks}): name a new file")
    for name in _LATER_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {_TYPES[FIELDS[name]]}")


def _open(path: Path, timeout: float = 30) -> sqlite3.Connection:
    """A connection to the store at ``path``, its table made or checked (in a write transaction: one that cannot
    write fails here); ``BadStore`` says why it cannot be."""
    try:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise BadStore(_why(exc, path)) from None
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")  # also the check that it can be written
        try:
            _make_table(db)
            db.execute("CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq)")
            db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        db.close()
        raise BadStore(_why(exc, path)) from None
    except BaseException:
        db.close()
        raise
    return db


def check_store(url: str) -> None:
    """Open the store ``url`` names (``sqlite:///...``), making or checking its table: ``BadStore`` says why it
    cannot be one. At start-up, before the model loads."""
    _open(Path(url.removeprefix("sqlite:///")).expanduser(), timeout=10).close()


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
        self._db = _open(self.path)
        self._lock = threading.Lock()  # the one connection, one call at a time (also from the opening thread)
        # One thread of its own: the calls are serial anyway, and on the event loop's shared pool a burst of them
        # would hold its threads waiting on the lock (the pool also encodes images) and grow it under load.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store-sqlite")

    async def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        def locked() -> Any:
            with self._lock:
                try:
                    return work(self._db)
                except sqlite3.Error as exc:
                    raise _classified(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._thread, locked)

    async def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        def atomic(db: sqlite3.Connection) -> Any:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            finally:
                # A failed statement or COMMIT (a full disk) may have rolled the transaction back already, or left it
                # open: never leave it open, or every later BEGIN would fail for good.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
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

    async def renew(
        self, owner: str, held: dict[str, int], lease_until: float, renewed_at: float | None = None
    ) -> dict[str, str]:
        fields = {"lease_until": lease_until, "renewed_at": time.time() if renewed_at is None else renewed_at}

        def renew(db: sqlite3.Connection) -> dict[str, str]:
            codes = {}
            for job_id, attempt in held.items():
                where = f"owner = ? AND attempt = ? AND {_UNFINISHED}"
                if not self._update(db, job_id, fields, where, owner, attempt):
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

    async def claim_next(
        self, owner: str, lease_until: float, renewed_at: float | None = None
    ) -> dict[str, Any] | None:
        now = time.time() if renewed_at is None else renewed_at

        def claim(db: sqlite3.Connection) -> dict[str, Any] | None:
            sql = f"SELECT * FROM jobs WHERE owner = '' AND {_UNFINISHED} ORDER BY seq LIMIT 1"
            record = _record(db.execute(sql).fetchone())
            if record is not None:
                record.update(owner=owner, attempt=record["attempt"] + 1, lease_until=lease_until, renewed_at=now)
                claimed = ("owner", "attempt", "lease_until", "renewed_at")
                self._update(db, record["id"], {k: record[k] for k in claimed})
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
        self._thread.shutdown(wait=False)
