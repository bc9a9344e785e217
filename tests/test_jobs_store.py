"""The job service's memory store (jobs/memory.py, jobs/job.py) on a real Engine (a runner that steps until stopped,
no model): admission, events, ETA, shutdown."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from jobs_helpers import answer_images, stepping_runner

from api.errors import APIError
from api.generation import job_failure
from engine import Engine, GenerationRequest, ProgressEvent
from jobs.job import Job, Subscriber
from jobs.memory import JobStore

FAILURE_OF = job_failure(0)  # the HTTP layer's description of a failed run (what the server gives the store)


def _request(steps: int = 1000, seed: int = 0) -> GenerationRequest:
    return GenerationRequest("p", steps, 1, seed, 16, 16, request_id=f"r{seed}")


def test_a_slow_subscriber_loses_steps_never_started_or_done() -> None:
    subscriber = Subscriber(capacity=8)
    subscriber.put("queued", {"position": 1})
    subscriber.put("started", {})
    for step in range(1, 101):
        subscriber.put("step", {"step": step})
    subscriber.put("done", {"status": "succeeded"})

    async def drain() -> list[tuple[str, Any]]:
        events = []
        while (event := await subscriber.get(0.01)) is not None:
            events.append(event)
        return events

    events = asyncio.run(drain())
    assert len(events) <= 9 and subscriber.dropped >= 93
    assert events[0] == ("started", {}) and events[-1] == ("done", {"status": "succeeded"})
    assert [data["step"] for name, data in events if name == "step"] == list(range(101 - len(events) + 2, 101))


def test_admission_has_no_race_with_a_request_scheduled_just_before() -> None:
    """The engine's last queue place goes to whoever reaches admission first; a job that loses is refused at once
    (503, no job made), never accepted to fail later."""

    async def scenario() -> None:
        engine = Engine(stepping_runner, max_concurrency=1, max_queue=1, release=lambda: None)
        engine.set_ready()
        store = JobStore(max_jobs=10, ttl=60, failure_of=FAILURE_OF)
        first = await store.start(_request(seed=1), engine, answer_images)
        # A request already scheduled (its task will run before the job's) takes the last place in the queue.
        other = asyncio.create_task(engine.submit(_request(seed=2)))
        with pytest.raises(APIError) as refused:
            await store.start(_request(seed=3), engine, answer_images)
        assert (refused.value.status, refused.value.code) == (503, "queue_full")
        assert refused.value.headers["Retry-After"]
        assert len(store) == 1 and engine.queued == 1
        store.cancel(first)
        other.cancel()
        await store.close(5)
        assert first.status == "cancelled"
        engine.close()

    asyncio.run(scenario())


def test_eta_follows_the_step_rate() -> None:
    job = Job(_request(steps=10))
    assert job.eta_s() is None
    job.on_progress(ProgressEvent("started"))
    assert job.status == "running" and job.eta_s() is None  # no ETA before the first step
    job.on_progress(ProgressEvent("step", step=2, total=10, elapsed_s=1.0))
    assert job.eta_s() == pytest.approx(4.0, abs=0.05)  # 0.5 s a step, 8 steps left
    job.finish("cancelled")
    assert job.eta_s() is None


def test_close_stops_every_job_and_leaves_no_task() -> None:
    async def scenario() -> set[asyncio.Task[Any]]:
        engine = Engine(stepping_runner, max_concurrency=1, max_queue=4, release=lambda: None)
        engine.set_ready()
        store = JobStore(max_jobs=10, ttl=60, failure_of=FAILURE_OF)
        store.open()
        jobs = [await store.start(_request(seed=seed), engine, answer_images) for seed in range(3)]
        await asyncio.sleep(0.1)
        assert await engine.drain(0.2) is False  # the shutdown timeout: the engine aborts what is left
        await store.close(5)
        engine.close()
        assert [job.status for job in jobs] == ["failed"] * 3
        assert {job.error.code for job in jobs if job.error} == {"draining"}
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    assert asyncio.run(scenario()) == set()
    assert not [t for t in threading.enumerate() if t.name.startswith("job")]


def test_a_cancelled_job_never_reports_steps_after_its_end() -> None:
    async def scenario() -> None:
        engine = Engine(stepping_runner, max_concurrency=1, max_queue=1, release=lambda: None)
        engine.set_ready()
        store = JobStore(max_jobs=10, ttl=60, failure_of=FAILURE_OF)
        job = await store.start(_request(), engine, answer_images)
        while job.step < 2:
            await asyncio.sleep(0.01)
        store.cancel(job)
        await store.close(5)
        step = job.step
        await asyncio.sleep(0.1)  # the worker thread's last reports arrive meanwhile
        assert job.step == step and job.status == "cancelled"
        engine.close()

    asyncio.run(scenario())


def test_a_job_that_takes_a_free_slot_is_running_at_once_and_started_is_said_once() -> None:
    async def scenario() -> list[list[str]]:
        engine = Engine(stepping_runner, max_concurrency=1, max_queue=1, release=lambda: None)
        engine.set_ready()
        store = JobStore(max_jobs=10, ttl=60, failure_of=FAILURE_OF)
        job = await store.start(_request(steps=3), engine, answer_images)
        assert (job.status, job.to_dict()["position"]) == ("running", None)
        early = job.subscribe()  # before the worker thread's "started" arrives: replayed
        await job.task  # type: ignore[misc]
        late = job.subscribe()
        names = []
        for subscriber in (early, late):
            events = []
            while (event := await subscriber.get(0.01)) is not None:
                events.append(event[0])
            names.append(events)
        engine.close()
        return names

    early, late = asyncio.run(scenario())
    assert early == ["started", "step", "step", "step", "done"] and late == ["done"]
