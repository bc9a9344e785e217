"""A durable job store that refuses writes, on real parts: a real ``redis-server`` past its ``maxmemory`` and a real
SQLite file on a small tmpfs filled up. No store error may strand a job (its end is written once the store accepts
it), kill the store's tick, answer a request 500, or crash the start; a job whose server died says so.

In-process job services (``jobs.durable.DurableJobs`` on an engine with a stepping runner) where no server process is
needed; real processes for the start-up checks and a takeover (tests/redis_helpers.py's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from fault_helpers import a_replica, fill, read_only, redis_saving_to, refusing_writes, saved, small_tmpfs
from http_helpers import assert_envelope
from jobs_helpers import BLOCKER, JOBS, answer_images, stepping_runner, submit, wait_final, wait_for
from redis_helpers import RedisProcess, Server

from api.generation import job_failure
from engine import Engine, GenerationRequest
from jobs.durable import DurableJobs
from jobs.errors import StoreRefused, StoreUnavailable

REPO = Path(__file__).resolve().parent.parent
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    redis.Redis(port=redis_server.port).flushdb()
    return redis_server.url


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tmpfs") as mounted:
        yield mounted


class Node:
    """One "server": its own engine and job service on the shared store; ``tick=False``: a reader that never ticks
    (it neither renews, reaps nor claims)."""

    def __init__(self, url: str, lease: float = 3.0, tick: bool = True) -> None:
        settings = SimpleNamespace(
            max_jobs=10, job_ttl=60, job_grace=60, job_lease=lease, job_max_attempts=3, request_timeout=0
        )
        self.engine = Engine(stepping_runner, max_concurrency=1, max_queue=4, release=lambda: None)
        self.engine.set_ready()
        if url.startswith("sqlite"):
            from jobs.sqlite import SQLiteBackend

            backend: Any = SQLiteBackend(url)
        else:
            from jobs.redis_store import RedisBackend

            backend = RedisBackend(url)
        self.jobs = DurableJobs(backend, settings, lambda context: answer_images, lambda: self.engine, job_failure(0))
        if tick:
            self.jobs.open()

    async def start(self, steps: int, seed: int = 0) -> str:
        request = GenerationRequest("p", steps, 1, seed, 16, 16, request_id=f"r{seed}")
        return (await self.jobs.start(request, self.engine, answer_images, context={})).id

    async def state(self, job_id: str) -> dict[str, Any]:
        state = await self.jobs.describe(job_id)
        assert state is not None
        return state

    async def close(self) -> None:
        await self.engine.drain(0)
        await self.jobs.close(5)
        self.engine.close()


async def _until(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)


async def _collect(events: Any) -> list[tuple[str, Any]]:
    return [event async for event in events if event is not None]


# -- 1: a job whose end the store refuses is finished once the store accepts it ---------------------------------------


async def _ends_once_the_store_accepts(node: Node, jobs: list[str], refusing: Any, accept: Any) -> list[Any]:
    """Runs ``jobs`` to their end while the store refuses writes; they wait (unfinished, no invented eta), and end
    with ``done`` to their followers once ``accept()`` has made the store take writes again."""
    followers = [asyncio.create_task(_collect(await node.jobs.follow(job))) for job in jobs]
    with refusing:
        await _until(lambda: _idle(node.engine))  # every run is over: only their ends are left to write
        await asyncio.sleep(1.5)  # the store refused each end at least once
        for job in jobs:
            state = await node.state(job)
            assert state["status"] == "running" and state["eta_s"] is None, state
            assert state["step"] == state["total_steps"]
        assert not any(follower.done() for follower in followers)
        accept()
    for job in jobs:
        await _until(lambda job=job: _status(node, job, "succeeded"), timeout=10)
        assert (await node.jobs.backend.load(job))["status"] == "succeeded"
    return [(await asyncio.wait_for(follower, 10))[-1] for follower in followers]


async def _idle(engine: Engine) -> bool:
    return engine.active == 0 and engine.queued == 0


async def _status(node: Node, job_id: str, status: str) -> bool:
    return (await node.state(job_id))["status"] == status


def test_a_job_whose_end_redis_refuses_ends_once_redis_accepts(redis_server: RedisProcess, redis_url: str) -> None:
    async def scenario() -> None:
        node = Node(redis_url)
        jobs = [await node.start(20, seed) for seed in (1, 2)]
        ends = await _ends_once_the_store_accepts(node, jobs, refusing_writes(redis_server.port), lambda: None)
        assert [name for name, _ in ends] == ["done", "done"]
        assert [data["result"] for _, data in ends] == [{"images": ["image of 1"]}, {"images": ["image of 2"]}]
        await node.close()

    asyncio.run(scenario())


def test_jobs_whose_end_a_full_disk_refuses_end_once_space_is_freed(tmpfs: Path) -> None:
    async def scenario() -> None:
        node = Node(f"sqlite:///{tmpfs / 'jobs.db'}")
        jobs = [await node.start(20, seed) for seed in (1, 2, 3)]
        filler = fill(tmpfs)
        ends = await _ends_once_the_store_accepts(node, jobs, contextlib.nullcontext(), filler.unlink)
        assert [data["status"] for _, data in ends] == ["succeeded"] * 3
        await node.close()

    asyncio.run(scenario())


def test_a_job_whose_end_cannot_be_written_at_all_fails_with_a_reason(tmp_path: Path) -> None:
    """Not a refusal but an error no retry mends (here: a result the store cannot encode): the job fails, and its
    followers are told why, instead of its task dying with the job unfinished for ever."""

    async def unstorable(generation: Any, result: Any) -> dict[str, Any]:
        return {"images": [object()]}

    async def scenario() -> None:
        node = Node(f"sqlite:///{tmp_path / 'jobs.db'}")
        request = GenerationRequest("p", 5, 1, 3, 16, 16, request_id="r3")
        job = (await node.jobs.start(request, node.engine, unstorable, context={})).id
        (name, data) = (await _collect(await node.jobs.follow(job)))[-1]
        assert name == "done" and data["status"] == "failed" and data["error"]["code"] == "job_store_error", data
        assert "could not be stored" in data["error"]["message"]
        assert (await node.jobs.backend.load(job))["status"] == "failed"
        await node.close()

    asyncio.run(scenario())


def test_every_way_redis_refuses_writes_is_a_refusal(redis_server: RedisProcess, redis_url: str, tmpfs: Path) -> None:
    """``maxmemory`` (OOM), a replica (READONLY), a snapshot that failed on a full disk (MISCONF): each is told as a
    store that refuses writes, whose reason says which, and the same write works once the store takes writes again."""
    from jobs.redis_store import RedisBackend

    async def refused(url: str, refusing: Any, job_id: str) -> str:
        backend = RedisBackend(url)
        with refusing, pytest.raises(StoreRefused) as refusal:
            await backend.insert({**_waiting(job_id), "created_at": time.time()}, 10, 0, 0, time.time())
        await backend.insert({**_waiting(job_id), "created_at": time.time()}, 10, 0, 0, time.time())
        assert (await backend.load(job_id))["id"] == job_id
        await backend.close()
        return str(refusal.value)

    assert "maxmemory" in asyncio.run(refused(redis_url, refusing_writes(redis_server.port), "oom"))
    assert "read only replica" in asyncio.run(refused(redis_url, a_replica(redis_server.port), "replica"))
    (tmpfs / "redis").mkdir()
    with redis_saving_to(tmpfs / "redis") as client:
        filler = fill(tmpfs)
        assert not saved(client)

        @contextlib.contextmanager
        def freed_and_saved() -> Iterator[None]:  # already refusing; frees the disk and saves once the test is done
            yield
            filler.unlink()
            assert saved(client)

        url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
        assert "MISCONF" in asyncio.run(refused(url, freed_and_saved(), "misconf"))


# -- 2: the tick survives every error, logs it once per kind and interval, and goes on ------------------------------


def test_the_tick_survives_a_failing_step_logs_it_once_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A step of the tick that fails every time (a bug, say) is logged once, with its traceback, not at every tick;
    the tick's other steps go on: the server renews its jobs and claims waiting ones."""

    async def scenario() -> None:
        node = Node(f"sqlite:///{tmp_path / 'jobs.db'}", lease=0.6)  # a tick every 0.2 s
        backend = node.jobs.backend

        async def broken_reap(now: float, max_attempts: int) -> list[Any]:
            raise RuntimeError("a bug in the reaper")

        backend.reap = broken_reap
        running = await node.start(1000, 1)
        first = (await backend.load(running))["lease_until"]
        waiting = {**_waiting("w1"), "created_at": time.time()}
        await backend.insert(waiting, 10, 0, 0, time.time())  # a job waiting for a server
        await asyncio.sleep(1.5)  # seven ticks or so
        assert (await backend.load(running))["lease_until"] > first + 1  # renewed meanwhile
        assert "w1" in node.jobs.local  # claimed, although the reaper failed at every tick
        await node.jobs.stop(running)
        await node.close()

    with caplog.at_level(logging.WARNING, logger="jobs.durable"):
        asyncio.run(scenario())
    told = [r for r in caplog.records if "a bug in the reaper" in r.getMessage() + str(r.exc_info)]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    assert told[0].exc_info is not None  # an unexpected error: its traceback, once


def _waiting(job_id: str) -> dict[str, Any]:
    """The record of a job waiting for a server (as a server that stopped leaves it)."""
    from jobs.records import body_of

    body = body_of(GenerationRequest("p", 5, 1, 2, 16, 16, request_id="w"))
    return {
        **{"id": job_id, "body": body, "context": {}, "status": "queued", "owner": "", "attempt": 0},
        **{"lease_until": 0.0, "cancel": 0, "step": 0, "finished_at": None, "result": None, "error": None},
    }


def test_a_server_whose_redis_refused_writes_still_takes_over_a_dead_servers_job(tmp_path: Path) -> None:
    """The issue's case: a SIGKILLed server's job, while Redis refuses writes for seconds; the other server's tick
    must come through it (logging it once) and run the job again once its lease has run out."""
    store = RedisProcess(tmp_path)
    flags = ("--job-store", store.url, "--job-lease", "3", "--max-steps", "1000", "--max-concurrency", "2")
    a, b = Server(tmp_path, *flags), Server(tmp_path, *flags)
    try:
        a.wait_ready(), b.wait_ready()
        with httpx.Client(base_url=a.url, timeout=60) as on_a, httpx.Client(base_url=b.url, timeout=60) as on_b:
            held = submit(on_b, BLOCKER)  # b holds a job throughout: it renews at every tick
            orphan = submit(on_a, {**BLOCKER, "num_inference_steps": 20, "height": 16, "width": 16, "seed": 2})
            wait_for(on_b, orphan, lambda state: state["step"] >= 1, timeout=60)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(timeout=30)
            with refusing_writes(store.port):
                time.sleep(5)
            state = wait_final(on_b, orphan, timeout=20)
            assert state["status"] == "succeeded", state
            on_b.delete(f"{JOBS}/{held}")
        log = b.log()
        assert log.count("refuses writes") == 1, log[-3000:]  # the tick's outage: once, not at every tick
        # Only the dead server's job was taken over: b's own, whose renewals Redis refused too, was not reaped.
        assert f"job {orphan}: its server stopped" in log and f"job {held}: its server stopped" not in log, log
        assert "Traceback" not in log, log[-3000:]
    finally:
        for server in (a, b):
            server.stop()
        store.stop()


# -- 3: POST /api/jobs while the store refuses writes is a 503 -------------------------------------------------------


def _refused(response: httpx.Response) -> None:
    error = assert_envelope(response, 503)
    assert error["code"] == "job_store_unavailable" and int(response.headers["retry-after"]) >= 1, error
    assert "refuses writes" in error["message"] and "/" not in error["message"], error  # why, and no file path


BODY = {"prompt": "a lighthouse", "num_inference_steps": 2, "height": 64, "width": 64, "seed": 1}


def test_a_job_posted_while_redis_refuses_writes_isanswer_imagesed_503(
    make_server: Any, redis_server: RedisProcess, redis_url: str
) -> None:
    live = make_server(job_store=redis_url)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        with refusing_writes(redis_server.port):
            _refused(client.post(JOBS, json=BODY))
        assert wait_final(client, submit(client, BODY))["status"] == "succeeded"


def test_a_job_posted_while_the_disk_is_full_isanswer_imagesed_503(make_server: Any, tmpfs: Path) -> None:
    live = make_server(job_store=f"sqlite:///{tmpfs / 'jobs.db'}")
    with httpx.Client(base_url=live.url, timeout=60) as client:
        filler = fill(tmpfs)
        _refused(client.post(JOBS, json=BODY))
        filler.unlink()
        assert wait_final(client, submit(client, BODY))["status"] == "succeeded"
    live.stop()


# -- 4: a --job-store sqlite:/// that cannot work ends the start with exit 2 ------------------------------------------


def _start(store: str) -> subprocess.CompletedProcess[str]:
    """The server's start with ``store``, on a model that does not exist: had the start got as far as loading a model,
    the error would be about it."""
    command = [sys.executable, str(REPO / "serverasync.py"), "--model", "/nonexistent/model", "--port", "0"]
    command += ["--host", "127.0.0.1", "--job-store", store]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)


def _refused_start(store: str, reason: str) -> None:
    result = _start(store)
    assert result.returncode == 2, result.stderr
    assert f"serverasync.py: error: --job-store {store}: " in result.stderr, result.stderr
    assert reason in result.stderr.partition("--job-store")[2], result.stderr
    assert "Traceback" not in result.stderr and "nonexistent" not in result.stderr, result.stderr


def test_a_sqlite_store_that_is_not_a_database_or_not_ours_ends_the_start(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database, but notes\n" * 200)
    _refused_start(f"sqlite:///{tmp_path / 'notes.db'}", "not an SQLite database")
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, payload TEXT)")
    db.close()
    _refused_start(f"sqlite:///{tmp_path / 'other.db'}", "its jobs table is not a job store's")


def test_a_sqlite_store_in_a_read_only_place_ends_the_start(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    with sqlite3.connect(source / "jobs.db") as db:  # a store made by an earlier start, now read-only
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()
    with read_only(source, tmp_path / "ro") as ro:
        _refused_start(f"sqlite:///{ro / 'new.db'}", "cannot be created")
        _refused_start(f"sqlite:///{ro / 'jobs.db'}", "read-only")


def test_a_good_sqlite_store_starts_and_an_older_one_gets_the_new_column(tmp_path: Path) -> None:
    from jobs.records import FIELDS
    from jobs.sqlite import check_store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    check_store(url)
    check_store(url)  # an existing store of ours: fine as it is
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)
    db.close()
    types = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "json": "TEXT"}
    older = [f"{name} {types[kind]}" for name, kind in FIELDS.items() if name != "renewed_at"]
    with sqlite3.connect(tmp_path / "older.db") as db:  # a store made before renewed_at was kept
        db.execute(f"CREATE TABLE jobs ({', '.join(older)})")
    db.close()
    check_store(f"sqlite:///{tmp_path / 'older.db'}")
    with sqlite3.connect(tmp_path / "older.db") as db:
        assert "renewed_at" in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    db.close()


# -- 5: a job whose runner stopped renewing says so, with no invented eta ------------------------------------------


class _Unreachable:
    """A backend cut off from the store (a partition, as good as a SIGKILL for the store): every call fails."""

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("cut off")

        return fail


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("redis_url")


def test_a_job_whose_runner_stopped_renewing_says_so_with_no_eta(store_url: str) -> None:
    async def scenario() -> None:
        a, reader = Node(store_url, lease=3), Node(store_url, tick=False)
        job = await a.start(1000, 1)
        await _until(lambda: _step(reader, job, 3))
        healthy, own = await reader.state(job), await a.state(job)
        assert healthy["waiting_for_takeover"] is False and healthy["eta_s"] is not None, healthy
        assert time.time() - 2 < healthy["runner_renewed_at"] <= time.time()
        assert own["waiting_for_takeover"] is False and own["runner_renewed_at"] is not None, own
        backend, a.jobs.backend = a.jobs.backend, _Unreachable()
        await asyncio.sleep(2.2)  # past a renewal (every second), not yet past the lease (3 s)
        stale = await reader.state(job)
        assert (stale["status"], stale["waiting_for_takeover"], stale["eta_s"]) == ("running", True, None), stale
        renewed = (await reader.jobs.backend.load(job))["lease_until"] - 3  # its last renewal
        assert stale["runner_renewed_at"] == pytest.approx(renewed, abs=0.01)
        await asyncio.sleep(1.5)  # the lease has run out, and nobody has taken the job over yet
        assert (await reader.state(job))["waiting_for_takeover"] is True
        a.jobs.backend = backend
        await a.close()
        await reader.close()

    asyncio.run(scenario())


async def _step(node: Node, job_id: str, step: int) -> bool:
    return (await node.state(job_id))["step"] >= step


def test_every_storeanswer_imagess_the_same_fields_and_the_schema_documents_them(store_url: str) -> None:
    from api.schemas import JobState
    from jobs.memory import JobStore

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        memory = JobStore(10, 60, failure_of=job_failure(0))
        node = Node(store_url)
        engine = node.engine
        request = GenerationRequest("p", 3, 1, 1, 16, 16, request_id="r1")
        in_memory = await memory.describe((await memory.start(request, engine, answer_images)).id)
        durable = await node.state(await node.start(3, 2))
        await memory.close(5)
        await node.close()
        return in_memory, durable

    in_memory, durable = asyncio.run(scenario())
    assert set(in_memory) == set(durable) == set(JobState.model_fields)
    assert in_memory["runner_renewed_at"] is None and in_memory["waiting_for_takeover"] is False
