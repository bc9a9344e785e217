"""Jobs that outlive their server, on real processes: ``python serverasync.py --job-store ...`` on a real
redis-server (two servers sharing it and an image directory) and on a SQLite file (one server killed and started
again). Servers are killed with SIGKILL: nothing of theirs runs after it, so what survives is the store's.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_helpers import NATIVE, assert_envelope, fetch_png, pixels
from jobs_helpers import BLOCKER, JOBS, follow, submit, wait_final, wait_for
from redis_helpers import RedisProcess, Server

pytestmark = pytest.mark.slow  # pyproject.toml's markers: CI runs it; -m 'not slow' leaves it out

LEASE = "4"  # seconds: a dead server's jobs run again about this long after it died (renewals every 4/3 s)
BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 60, "height": 64, "width": 64, "seed": 21}


def _start(tmp: Path, store: str, *args: str, port: int | None = None) -> Server:
    flags = ("--job-store", store, "--job-lease", LEASE, "--max-steps", "1000", "--max-concurrency", "1", *args)
    return Server(tmp, *flags, port=port).wait_ready()


def _images(client: httpx.Client, urls: list[str], base: str) -> list[Any]:
    """Pixels of each image; the URL's host replaced by ``base`` (a server's own URL; the directory is shared)."""
    return [pixels(fetch_png(base + url[url.index("/images/") :], client)) for url in urls]


def _fresh(client: httpx.Client, body: dict[str, Any], base: str) -> list[Any]:
    """The images a fresh synchronous run of ``body`` (its seed) gives."""
    answer = client.post(base + NATIVE, json=body)
    assert answer.status_code == 200, answer.text
    return _images(client, answer.json()["response"], base)


class Pair:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisProcess(tmp)
        self.a = _start(tmp, self.redis.url)
        self.b = _start(tmp, self.redis.url)

    def stop(self) -> None:
        for server in (self.a, self.b):
            server.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    servers = Pair(tmp_path_factory.mktemp("pair"))
    yield servers
    servers.stop()


def test_any_server_answers_and_follows_a_job_the_other_runs(pair: Pair) -> None:
    with httpx.Client(timeout=120) as client:
        created = client.post(pair.a.url + JOBS, json=BODY)
        assert created.status_code == 202, created.text
        job = created.json()["id"]
        with httpx.Client(base_url=pair.b.url, timeout=120) as other:
            seen = wait_for(other, job, lambda state: state["status"] == "running" and state["step"] >= 1)
            assert seen["seed"] == 21 and seen["total_steps"] == 60
            events = follow(other, job)  # the events, through the server that does not run it
            state_b = other.get(f"{JOBS}/{job}").json()
        state_a = client.get(f"{pair.a.url}{JOBS}/{job}").json()
    names = [name for name, _ in events]
    assert names[0] == "started" and "step" in names and names[-1] == "done", names
    steps = [data["step"] for name, data in events if name == "step"]
    assert steps == sorted(steps) and steps[-1] == 60
    assert events[-1][1] == state_b and state_a["status"] == "succeeded"
    # The same job on both, its image URLs built for each server's client (the image directory is shared).
    on_b = [url.replace(pair.a.url, pair.b.url) for url in state_a["result"]["response"]]
    assert state_b == {**state_a, "result": {**state_a["result"], "response": on_b}}
    assert assert_envelope(httpx.get(f"{pair.b.url}{JOBS}/nope", timeout=30), 404)["code"] == "job_not_found"


def test_a_cancel_through_the_other_server_stops_the_job_where_it_runs(pair: Pair) -> None:
    with httpx.Client(base_url=pair.a.url, timeout=120) as a, httpx.Client(base_url=pair.b.url, timeout=120) as b:
        job = submit(a, BLOCKER)  # runs on a for minutes unless cancelled
        wait_for(b, job, lambda state: state["step"] >= 2)
        cancelled = b.delete(f"{JOBS}/{job}").json()
        assert cancelled["status"] == "cancelled" and cancelled["step"] < 1000
        assert a.get(f"{JOBS}/{job}").json() == cancelled
        deadline = time.monotonic() + 30  # its slot thread stops at its next step, in the background
        while (status := a.get("/api/status").json())["active_inferences"] and time.monotonic() < deadline:
            time.sleep(0.05)
    assert status["active_inferences"] == 0 and status["requests"]["cancelled"] >= 1


def test_a_redis_that_goes_away_and_comes_back(pair: Pair) -> None:
    with httpx.Client(base_url=pair.a.url, timeout=120) as a, httpx.Client(base_url=pair.b.url, timeout=120) as b:
        stored = submit(a, {**BODY, "num_inference_steps": 4, "seed": 5})
        assert wait_final(b, stored)["status"] == "succeeded"
        running = submit(a, {**BODY, "num_inference_steps": 150, "seed": 6})
        wait_for(a, running, lambda state: state["step"] >= 1)
        pair.redis.stop()
        try:
            refused = b.post(JOBS, json=BODY)
            unreadable = b.get(f"{JOBS}/{stored}")
            local = a.get(f"{JOBS}/{running}")  # the server running it still answers for it
            time.sleep(1)
        finally:
            pair.redis.start()
        for response in (refused, unreadable):
            error = assert_envelope(response, 503)
            assert error["code"] == "job_store_unavailable" and int(response.headers["retry-after"]) >= 1
        assert local.status_code == 200 and local.json()["status"] == "running"
        assert b.get(f"{JOBS}/{stored}").json()["status"] == "succeeded"  # nothing stored was lost
        assert wait_final(b, running)["status"] == "succeeded"  # the run's end reached the store once it was back
        assert submit(b, {**BODY, "num_inference_steps": 2}) is not None
    # The outage was answered (the 503s above), never a traceback. Whether a server also logged it depends on
    # whether its lease tick fell in the outage's second: not asserted.
    for server in (pair.a, pair.b):
        assert "Traceback" not in server.log(), server.log()[-3000:]


def test_a_job_whose_server_is_killed_runs_again_on_the_other(pair: Pair) -> None:
    """Last in the module: it kills server a."""
    body = {**BODY, "num_inference_steps": 300, "seed": 77}
    with httpx.Client(timeout=120) as client:
        created = client.post(pair.a.url + JOBS, json=body)
        job = created.json()["id"]
        with httpx.Client(base_url=pair.b.url, timeout=120) as b:
            wait_for(b, job, lambda state: state["step"] >= 3)
            pair.a.proc.send_signal(signal.SIGKILL)
            pair.a.proc.wait(timeout=30)
            state = wait_final(b, job, timeout=180)
        assert state["status"] == "succeeded", state
        assert state["result"]["seed"] == 77
        again = _images(client, state["result"]["response"], pair.b.url)
        assert again == _fresh(client, body, pair.b.url)
    assert re.search(rf"job {re.escape(job)}: run 2 on this server", pair.b.log()), pair.b.log()[-2000:]


# -- SQLite: one server, killed and started again on its file -------------------------------------------------------


def test_a_server_killed_and_restarted_on_sqlite_finds_its_jobs_and_runs_the_rest_in_order(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = _start(tmp_path, store)
    try:
        with httpx.Client(base_url=first.url, timeout=120) as client:
            done = submit(client, {**BODY, "num_inference_steps": 2, "seed": 1})
            finished = wait_final(client, done)
            bodies = [{**BODY, "num_inference_steps": 200, "seed": 2}]
            bodies += [{**BODY, "num_inference_steps": 3, "seed": seed} for seed in (3, 4, 5)]
            queue = [submit(client, body) for body in bodies]
            wait_for(client, queue[0], lambda state: state["step"] >= 2)
            assert client.get(f"{JOBS}/{queue[-1]}").json()["position"] == 3
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
        first.stop()
    second = _start(tmp_path, store, port=first.port)  # the same port: the URLs handed out stay good
    try:
        with httpx.Client(base_url=second.url, timeout=120) as client:
            assert client.get(f"{JOBS}/{done}").json() == finished  # with its result
            states = [wait_final(client, job, timeout=180) for job in queue]
            assert [s["status"] for s in states] == ["succeeded"] * 4, states
            for body, state in zip(bodies[1:], states[1:], strict=True):
                assert _images(client, state["result"]["response"], second.url) == _fresh(client, body, second.url)
        started = re.findall(r"job ([\w-]+): run 2 on this server", second.log())
        assert started[:4] == queue, (started, queue)  # run again in their order
    finally:
        second.stop()


def test_a_job_that_keeps_killing_its_server_fails_after_its_attempts(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    server = _start(tmp_path, store, "--job-max-attempts", "2")
    with httpx.Client(base_url=server.url, timeout=120) as client:
        job = submit(client, BLOCKER)
    for attempt in (1, 2):  # the job "crashes" its server each time it runs
        with httpx.Client(base_url=server.url, timeout=120) as client:
            wait_for(client, job, lambda state: state["status"] == "running" and state["step"] >= 1, timeout=180)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        server.stop()
        server = _start(tmp_path, store, "--job-max-attempts", "2", port=server.port)
        assert attempt == 1 or "run 2 on this server" not in server.log()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            state = wait_final(client, job, timeout=120)
            health = client.post(NATIVE, json={**BODY, "num_inference_steps": 2})
    finally:
        server.stop()
    assert state["status"] == "failed" and state["error"]["code"] == "too_many_attempts", state
    assert "started 2 time(s)" in state["error"]["message"]
    assert health.status_code == 200  # the server itself is fine: the job is not run a third time
