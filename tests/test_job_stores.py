"""The durable job stores (jobs/) on a real SQLite file and a real redis-server, in-process: the fenced
writes (a job ends once, and only by its current run), attempts, the store-wide bound, cancel and events across two
job services (two "servers" on one store), and a stopped server handing its jobs back. Real processes:
tests/test_jobs_durable.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from jobs_helpers import answer_images, stepping_runner
from redis_helpers import RedisProcess

from api.generation import job_failure
from engine import Engine, GenerationRequest
from jobs.durable import DurableJobs
from jobs.errors import TooManyJobs
from jobs.records import REQUEUED

DB = 1  # the in-process tests' Redis database, flushed before each test


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server = request.getfixturevalue("redis_server")
    redis.Redis(port=server.port, db=DB).flushdb()
    return f"redis://127.0.0.1:{server.port}/{DB}"


def _backend(url: str) -> Any:
    if url.startswith("sqlite"):
        from jobs.sqlite import SQLiteBackend

        return SQLiteBackend(url)
    from jobs.redis_store import RedisBackend

    return RedisBackend(url)


def _record(job_id: str, owner: str, lease_until: float) -> dict[str, Any]:
    body = {"prompt": "p", "num_inference_steps": 10, "num_images": 1, "seed": 7, "height": 16, "width": 16}
    return {
        **{"id": job_id, "created_at": time.time(), "body": body, "context": {}, "status": "queued"},
        **{"owner": owner, "attempt": 1, "lease_until": lease_until, "cancel": 0, "step": 0, "finished_at": None},
    }


def _ended(status: str = "succeeded") -> dict[str, Any]:
    return {"status": status, "owner": "", "finished_at": time.time(), "result": {"images": [status]}, "error": None}


def test_a_job_ends_once_and_only_by_its_current_run(store_url: str) -> None:
    async def scenario() -> None:
        backend = _backend(store_url)
        now = time.time()
        await backend.insert(_record("j1", "A", now - 1), 10, 0, 0, now)  # A's lease has run out: A died
        assert [r["id"] for r in await backend.reap(now, 3)] == ["j1"]
        assert (await backend.load("j1"))["owner"] == ""
        claimed = await backend.claim_next("B", now + 30)
        assert (claimed["id"], claimed["owner"], claimed["attempt"]) == ("j1", "B", 2)
        assert await backend.claim_next("C", now + 30) is None  # one run at a time
        # A comes back (it was only paused): its writes change nothing.
        await backend.progress("j1", "A", 1, {"step": 9}, ("step", {"step": 9}))
        assert await backend.finish("j1", "A", 1, _ended("failed"), {}) is False
        assert (await backend.renew("A", {"j1": 1}, now + 30)) == {"j1": "lost"}
        assert (await backend.load("j1"))["step"] == 0
        assert (await backend.renew("B", {"j1": 2}, now + 30)) == {"j1": "ok"}
        assert await backend.finish("j1", "B", 2, _ended(), {}) is True
        assert await backend.finish("j1", "B", 2, _ended("failed"), {}) is False  # never twice
        record = await backend.load("j1")
        assert (record["status"], record["result"]) == ("succeeded", {"images": ["succeeded"]})
        await backend.close()

    asyncio.run(scenario())


def test_a_job_whose_server_keeps_dying_fails_after_its_attempts(store_url: str) -> None:
    async def scenario() -> None:
        backend = _backend(store_url)
        now = time.time()
        await backend.insert(_record("j1", "A", now - 1), 10, 0, 0, now)
        assert (await backend.reap(now, 2))[0]["status"] == "queued"  # run 1 of 2 lost: again
        assert (await backend.claim_next("B", now - 1))["attempt"] == 2  # B claims it, and dies at once
        (record,) = await backend.reap(now, 2)
        assert (record["status"], record["error"]["code"]) == ("failed", "too_many_attempts")
        assert "started 2 time(s)" in record["error"]["message"]
        assert await backend.claim_next("C", now + 30) is None and await backend.reap(now + 60, 2) == []
        await backend.close()

    asyncio.run(scenario())


class Node:
    """One "server": its own engine and job service on the shared store."""

    def __init__(self, url: str, max_jobs: int = 10) -> None:
        settings = SimpleNamespace(
            max_jobs=max_jobs, job_ttl=60, job_grace=60, job_lease=3, job_max_attempts=3, request_timeout=0
        )
        self.engine = Engine(stepping_runner, max_concurrency=1, max_queue=4, release=lambda: None)
        self.engine.set_ready()
        self.jobs = DurableJobs(
            _backend(url), settings, lambda context: answer_images, lambda: self.engine, job_failure(0)
        )
        self.jobs.open()

    async def start(self, steps: int, seed: int = 0) -> str:
        request = GenerationRequest("p", steps, 1, seed, 16, 16, request_id=f"r{seed}")
        return (await self.jobs.start(request, self.engine, answer_images, context={})).id

    async def close(self) -> None:
        await self.engine.drain(0)
        await self.jobs.close(5)
        self.engine.close()


async def _until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


def test_the_bound_holds_for_the_store_and_a_cancel_reaches_the_running_server(store_url: str) -> None:
    async def scenario() -> None:
        a, b = Node(store_url, max_jobs=2), Node(store_url, max_jobs=2)
        first, second = await a.start(1000, 1), await b.start(1000, 2)
        for node in (a, b):
            with pytest.raises(TooManyJobs) as refused:  # the HTTP layer answers it 503 too_many_jobs
                await node.start(10)
            assert refused.value.held == 2 and refused.value.retry_after >= 1
            assert "job store holds 2 jobs" in refused.value.message
        await _until(lambda: _is(a, first, lambda s: s["step"] >= 2))
        cancelled = await b.jobs.stop(first)  # through the other server
        assert cancelled["status"] == "cancelled" and cancelled["step"] < 1000
        await _until(lambda: _idle(a))  # it stopped where it ran
        assert (await a.jobs.describe(first)) == cancelled
        assert (await a.jobs.stop(second))["status"] == "cancelled"
        third = await b.start(3, 3)  # the cancelled jobs made room
        await _until(lambda: _is(a, third, lambda s: s["status"] == "succeeded"))
        for node in (a, b):
            await node.close()

    asyncio.run(scenario())


async def _is(node: Node, job_id: str, predicate: Any) -> bool:
    state = await node.jobs.describe(job_id)
    return state is not None and predicate(state)


async def _idle(node: Node) -> bool:
    return node.engine.active == 0 and not node.jobs.local


def test_a_follower_on_another_server_gets_the_replay_then_every_end(store_url: str) -> None:
    async def scenario() -> list[tuple[str, Any]]:
        a, b = Node(store_url), Node(store_url)
        job = await a.start(60)
        await _until(lambda: _is(b, job, lambda s: s["step"] >= 5))
        events = [event async for event in await b.jobs.follow(job) if event is not None]
        assert events[-1][1] == await a.jobs.describe(job) == await b.jobs.describe(job)
        for node in (a, b):
            await node.close()
        return events

    events = asyncio.run(scenario())
    names = [name for name, _ in events]
    assert names[0] == "started" and names[1] == "step" and names[-1] == "done", names
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["result"] == {"images": ["image of 0"]}
    steps = [data["step"] for name, data in events if name == "step"]
    # The replayed step, then live ones, in order (SQLite's poll, or a slow reader, may skip some).
    assert steps == sorted(set(steps)) and len(steps) >= 2, steps


def test_a_server_that_stops_hands_its_jobs_back_to_another(store_url: str) -> None:
    async def scenario() -> None:
        a, b = Node(store_url), Node(store_url)
        running, queued = await a.start(1000, 1), await a.start(20, 2)
        await _until(lambda: _is(a, running, lambda s: s["step"] >= 2))
        await a.close()  # the drain stops both: they go back to the store, not counted as attempts
        record = await b.jobs.backend.load(queued)
        assert (record["owner"], record["attempt"], record["status"]) == ("", 0, "queued")
        await b.jobs.tick()  # b claims them, oldest first
        assert list(b.jobs.local) == [running, queued]
        await b.jobs.stop(running)
        await _until(lambda: _is(b, queued, lambda s: s["status"] == "succeeded"))
        assert (await b.jobs.backend.load(queued))["attempt"] == 1
        await b.close()

    asyncio.run(scenario())


def test_requeued_fields_reset_the_run() -> None:
    assert REQUEUED["owner"] == "" and REQUEUED["status"] == "queued" and REQUEUED["step"] == 0


def test_a_stored_request_comes_back_whole_with_its_image_mask_and_adapters() -> None:
    """What a durable store keeps of a job is enough to run it again exactly: every field (the inpainting feather,
    mask_blur, among them), the init image and the mask pixel for pixel (their modes too), the LoRA set with its
    order and scales."""
    import dataclasses
    import json

    import numpy as np
    from PIL import Image

    from engine import GenerationRequest
    from jobs.records import body_of, generation_of

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    mask = Image.fromarray((np.arange(16 * 24).reshape(16, 24) % 2 * 255).astype(np.uint8), mode="L")
    request = GenerationRequest(
        prompt="a boat",
        num_inference_steps=5,
        num_images=2,
        seed=7,
        height=16,
        width=24,
        task="inpainting",
        image=image,
        mask_image=mask,
        strength=0.8,
        loras=(("neon", 0.5), ("ink", 1.0)),
        preview_every=2,
        mask_blur=3,
    )
    back = generation_of(json.loads(json.dumps(body_of(request))))
    assert back.loras == (("neon", 0.5), ("ink", 1.0))
    assert (back.image.mode, back.mask_image.mode) == ("RGB", "L")
    assert back.image.tobytes() == image.tobytes() and back.mask_image.tobytes() == mask.tobytes()
    fields = [f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("image", "mask_image")]
    assert {name: getattr(back, name) for name in fields} == {name: getattr(request, name) for name in fields}
    assert back.mask_blur == 3
    plain = generation_of(json.loads(json.dumps(body_of(GenerationRequest("x", 2, 1, 3, 16, 16)))))
    assert (plain.image, plain.mask_image, plain.loras) == (None, None, ())
