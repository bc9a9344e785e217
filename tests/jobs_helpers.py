"""Helpers for the jobs tests: following a job's event stream, waiting for its end, counting the engine's steps."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections import Counter
from typing import Any

import httpx

JOBS = "/api/jobs"
FINAL = {"succeeded", "failed", "cancelled"}
# A job that holds a slot until it is cancelled (minutes of work on the tiny model); needs max_steps=1000.
BLOCKER = {"prompt": "hold the slot", "num_inference_steps": 1000, "height": 64, "width": 64, "seed": 1}


def stored_jobs(live: Any) -> int:
    """How many jobs a live server's store holds: the memory store's count, or the rows of its SQLite file (the
    default store, ``DATA_DIR/jobs.db``)."""
    store = live.app.state.jobs
    if hasattr(store, "__len__"):
        return len(store)
    url = live.app.state.settings.job_store
    assert url.startswith("sqlite:///"), url
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def stored_statuses(live: Any) -> dict[str, str]:
    """Every job a live server's store holds, by id, with its status (the memory store's, or its SQLite file's)."""
    store = live.app.state.jobs
    if hasattr(store, "ids"):
        return {job: store.get(job).status for job in store.ids()}
    url = live.app.state.settings.job_store
    assert url.startswith("sqlite:///"), url
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
        return {str(job): str(status) for job, status in db.execute("SELECT id, status FROM jobs")}


def read_events(response: httpx.Response) -> Any:
    """Yield (event, data) from an open SSE response; comment lines are skipped."""
    name, data = None, None
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
        elif line == "" and data is not None:
            yield name, data
            name, data = None, None


def follow(client: httpx.Client, job_id: str, until: str = "done", timeout: float = 120) -> list[tuple[str, Any]]:
    """Every event of a job's stream until ``until`` (the stream must end right after ``done``)."""
    events = []
    with client.stream("GET", f"{JOBS}/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in read_events(response):
            events.append(event)
            if event[0] == until and until != "done":
                return events
    assert events and events[-1][0] == "done", events
    return events


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    answer = client.post(JOBS, json=body)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def wait_for(client: httpx.Client, job_id: str, predicate: Any, timeout: float = 120) -> dict[str, Any]:
    """Poll GET /api/jobs/{id} until ``predicate(state)``; return that state."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.get(f"{JOBS}/{job_id}").json()
        if predicate(state):
            return state
        assert time.monotonic() < deadline, f"job never got there: {state}"
        time.sleep(0.02)


def wait_final(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(client, job_id, lambda state: state["status"] in FINAL, timeout)


def wait_idle(engine: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while engine.active or engine.queued:
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.02)


class CountingRunner:
    """Wraps the engine's real runner: counts, per request id, the denoising steps that really ran (the step
    callback returned, i.e. was not cancelled). Everything else is the wrapped runner's."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.steps: Counter[str] = Counter()
        self.started: list[str] = []
        self._lock = threading.Lock()  # steps are counted from the engine's worker threads

    def __call__(self, request: Any, on_step: Any) -> Any:
        with self._lock:
            self.started.append(request.request_id)

        def counted(step: int, latents: Any = None) -> None:
            on_step(step, latents)  # raises when the request was cancelled: that step is not counted
            with self._lock:
                self.steps[request.request_id] += 1

        return self.runner(request, counted)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def count_steps(live: Any) -> CountingRunner:
    """Install a CountingRunner on a live server's engine (it reads its runner at every request)."""
    counting = CountingRunner(live.engine.runner)
    live.engine.runner = counting
    return counting


def stepping_runner(request: Any, on_step: Any) -> list[Any]:
    """An engine runner that steps (10 ms each) until done or cancelled, like a pipeline, and makes no image."""
    for step in range(request.num_inference_steps):
        time.sleep(0.01)
        on_step(step, None)
    return [f"image of {request.seed}"]


async def answer_images(generation: Any, result: Any) -> dict[str, Any]:
    """A job's answer: the runner's images as they are."""
    return {"images": result.images}
