"""Jobs through a real server on loopback: the life cycle on both engines, cancellation, disconnects, bounds."""

from __future__ import annotations

import base64
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from http_helpers import NATIVE, assert_envelope, fetch_png, open_png, pixels
from jobs_helpers import (
    BLOCKER,
    JOBS,
    count_steps,
    follow,
    read_events,
    stored_jobs,
    submit,
    wait_final,
    wait_for,
    wait_idle,
)

BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 4, "height": 64, "width": 64, "seed": 11}


@pytest.mark.parametrize("engine", ["threads", "step"])
def test_life_cycle(make_server: Callable[..., Any], engine: str) -> None:
    live = make_server(engine=engine, max_concurrency=1, max_steps=1000)
    with httpx.Client(base_url=live.url, timeout=120) as client:
        blocker = submit(client, BLOCKER)  # holds the one slot, so the job under test is queued first
        wait_for(client, blocker, lambda state: state["status"] == "running")
        created = client.post(JOBS, json={**BODY, "num_images_per_prompt": 2, "preview_every": 2})
        assert created.status_code == 202, created.text
        job = created.json()
        assert set(job) == {"id", "status", "status_url", "events_url"} and job["status"] == "queued"
        assert len(job["id"]) >= 22  # 128 random bits
        assert job["status_url"] == f"{live.url}{JOBS}/{job['id']}" == created.headers["location"]
        assert job["events_url"] == job["status_url"] + "/events"
        queued = client.get(job["status_url"]).json()
        assert (queued["status"], queued["position"], queued["step"], queued["eta_s"]) == ("queued", 1, 0, None)
        assert queued["total_steps"] == 4 and queued["seed"] == 11 and queued["result"] is None

        events = []
        with client.stream("GET", job["events_url"]) as response:
            for event in read_events(response):
                events.append(event)
                if len(events) == 1:
                    client.delete(f"{JOBS}/{blocker}")  # the job under test starts now
        state = client.get(job["status_url"]).json()
        sync = client.post(NATIVE, json={**BODY, "num_images_per_prompt": 2})
        assert sync.status_code == 200, sync.text
        job_images = [pixels(fetch_png(url, client)) for url in state["result"]["response"]]
        sync_images = [pixels(fetch_png(url, client)) for url in sync.json()["response"]]

    names = [name for name, _ in events]
    # The preview (after step 2, never after the last) is encoded off the event loop: it may follow step 3.
    assert [n for n in names if n != "preview"] == ["queued", "started", "step", "step", "step", "step", "done"]
    assert names.count("preview") == 1 and names.index("preview") > names.index("step") + 1, names
    assert events[0][1] == {"position": 1}
    steps = [data for name, data in events if name == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and {s["total"] for s in steps} == {4}
    assert all(s["elapsed_s"] >= 0 for s in steps)
    preview = events[names.index("preview")][1]
    assert (preview["step"], preview["total"], len(preview["images"])) == (2, 4, 2)
    for encoded in preview["images"]:  # the latents' resolution: 1/8 of the image's side
        assert open_png(base64.b64decode(encoded, validate=True)).size == (8, 8)
    done = events[-1][1]
    assert done == state
    assert (state["status"], state["step"], state["position"], state["error"]) == ("succeeded", 4, None, None)
    assert state["result"]["seed"] == 11 and state["result"]["parameters"]["num_images_per_prompt"] == 2
    assert set(state["result"]) == set(sync.json())
    assert job_images == sync_images  # the same seed gives the same images as the synchronous API


def test_every_subscriber_sees_the_job_and_a_finished_jobs_stream_is_just_done(
    make_server: Callable[..., Any],
) -> None:
    live = make_server()
    with httpx.Client(base_url=live.url, timeout=120) as client:
        job = submit(client, {**BODY, "num_inference_steps": 12})
        with ThreadPoolExecutor(3) as pool:  # three clients following the job at once
            streams = list(pool.map(lambda _: follow(client, job), range(3)))
        replay = follow(client, job)
    for events in streams:
        names = [name for name, _ in events]
        assert events[-1] == streams[0][-1] and events[-1][1]["status"] == "succeeded"
        assert "step" in names and "preview" not in names  # previews were not asked for
    assert [name for name, _ in replay] == ["done"] and replay[0][1] == streams[0][-1][1]


def test_cancel_a_queued_job_it_never_runs(make_server: Callable[..., Any]) -> None:
    live = make_server(max_concurrency=1, max_steps=1000)
    counting = count_steps(live)
    with httpx.Client(base_url=live.url, timeout=120) as client:
        blocker = submit(client, BLOCKER)
        wait_for(client, blocker, lambda state: state["step"] >= 1)
        created = client.post(JOBS, json=BODY)
        job, request_id = created.json()["id"], created.headers["x-request-id"]
        cancelled = client.delete(f"{JOBS}/{job}")
        events = follow(client, job)
        client.delete(f"{JOBS}/{blocker}")
        wait_idle(live.engine)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["step"] == 0 and cancelled.json()["result"] is None
    assert [name for name, _ in events] == ["done"] and events[0][1]["status"] == "cancelled"
    assert request_id not in counting.started and counting.steps[request_id] == 0
    assert len(counting.started) == 1  # the blocker only


@pytest.mark.parametrize("engine", ["threads", "step"])
def test_cancel_a_running_job_it_stops_within_a_step(make_server: Callable[..., Any], engine: str) -> None:
    live = make_server(engine=engine, max_steps=1000)
    counting = count_steps(live)
    with httpx.Client(base_url=live.url, timeout=120) as client:
        created = client.post(JOBS, json=BLOCKER)
        job, request_id = created.json()["id"], created.headers["x-request-id"]
        wait_for(client, job, lambda state: state["step"] >= 3)
        cancelled = client.delete(f"{JOBS}/{job}").json()
        wait_idle(live.engine)
        final = client.get(f"{JOBS}/{job}").json()
        again = client.delete(f"{JOBS}/{job}").json()
    assert cancelled["status"] == "cancelled" and cancelled["eta_s"] is None
    assert final == again == cancelled  # a finished job keeps its end, whatever comes later
    # The steps reported when the cancel was answered, and the steps that really ran: at most the one in flight
    # (and one whose report was on its way) more.
    ran = counting.steps[request_id]
    assert cancelled["step"] <= ran <= cancelled["step"] + 2, (cancelled["step"], ran)
    assert ran < 1000


def test_a_job_outlives_its_clients_disconnect(make_server: Callable[..., Any]) -> None:
    live = make_server()
    with httpx.Client(base_url=live.url, timeout=120) as client:
        job = submit(client, {**BODY, "num_inference_steps": 12})
        with client.stream("GET", f"{JOBS}/{job}/events") as response:
            assert response.status_code == 200
            next(response.iter_lines())  # connected, then gone mid-stream
    # A new client, later.
    with httpx.Client(base_url=live.url, timeout=120) as client:
        state = wait_final(client, job)
        assert state["status"] == "succeeded", state
        images = [fetch_png(url, client) for url in state["result"]["response"]]
    assert len(images) == 1 and open_png(images[0]).size == (64, 64)
    assert live.engine.stats["disconnected"] == 0 and live.engine.stats["completed"] == 1


def test_a_jobs_images_come_in_its_output_format(make_server: Callable[..., Any]) -> None:
    live = make_server()
    with httpx.Client(base_url=live.url, timeout=120) as client:
        job = submit(client, {**BODY, "output_format": "jpeg", "output_compression": 40})
        state = wait_final(client, job)
        assert state["status"] == "succeeded", state
        parameters = state["result"]["parameters"]
        assert (parameters["output_format"], parameters["output_compression"]) == ("jpeg", 40)
        (url,) = state["result"]["response"]
        assert url.endswith(".jpg")
        image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content[:3] == b"\xff\xd8\xff"  # a JPEG's start of image


def test_a_subscriber_that_never_reads_does_not_hold_the_job(make_server: Callable[..., Any]) -> None:
    live = make_server()
    with httpx.Client(base_url=live.url, timeout=120) as client, httpx.Client(base_url=live.url) as lazy:
        job = submit(client, {**BODY, "num_inference_steps": 40, "preview_every": 1})
        with lazy.stream("GET", f"{JOBS}/{job}/events") as response:
            assert response.status_code == 200  # open, never read
            state = wait_final(client, job)
    assert state["status"] == "succeeded" and state["step"] == 40


def test_unknown_ids_are_404(make_server: Callable[..., Any]) -> None:
    live = make_server()
    with httpx.Client(base_url=live.url, timeout=30) as client:
        for method, path in (("GET", "nope"), ("DELETE", "nope"), ("GET", "nope/events")):
            error = assert_envelope(client.request(method, f"{JOBS}/{path}"), 404)
            assert error["code"] == "job_not_found" and error["type"] == "not_found_error"


def test_invalid_bodies_are_answered_before_a_job_exists(make_server: Callable[..., Any]) -> None:
    live = make_server()
    with httpx.Client(base_url=live.url, timeout=30) as client:
        assert assert_envelope(client.post(JOBS, json={**BODY, "height": 72}), 400, "height")
        assert assert_envelope(client.post(JOBS, json={**BODY, "preview_every": -1}), 400, "preview_every")
        assert assert_envelope(client.post(JOBS, json={**BODY, "typo": 1}), 400, "typo")
    assert stored_jobs(live) == 0 and live.engine.stats["total"] == 0


def test_full_engine_is_503_at_once_and_no_job_is_made(make_server: Callable[..., Any]) -> None:
    live = make_server(max_concurrency=1, max_queue=1, max_steps=1000)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        running, queued = submit(client, BLOCKER), submit(client, BLOCKER)
        wait_for(client, queued, lambda state: state["position"] == 1)
        refused = client.post(JOBS, json=BODY)
        sync = client.post(NATIVE, json=BODY)
        for job in (running, queued):
            client.delete(f"{JOBS}/{job}")
    error = assert_envelope(refused, 503)
    assert (error["type"], error["code"]) == ("overloaded_error", "queue_full") and refused.headers["retry-after"]
    assert assert_envelope(sync, 503)["code"] == "queue_full"
    assert stored_jobs(live) == 2


def test_store_full_of_unfinished_jobs_is_503(make_server: Callable[..., Any]) -> None:
    live = make_server(max_concurrency=1, max_jobs=2, max_steps=1000)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        jobs = [submit(client, BLOCKER), submit(client, BLOCKER)]
        refused = client.post(JOBS, json=BODY)
        for job in jobs:
            client.delete(f"{JOBS}/{job}")
        after = client.post(JOBS, json=BODY)  # the cancelled ones make room
    error = assert_envelope(refused, 503)
    assert (error["type"], error["code"]) == ("overloaded_error", "too_many_jobs") and refused.headers["retry-after"]
    assert after.status_code == 202


def test_store_keeps_its_bound_oldest_finished_first(make_server: Callable[..., Any]) -> None:
    live = make_server(max_jobs=3, job_grace=0)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        jobs = []
        for seed in range(5):
            jobs.append(submit(client, {**BODY, "num_inference_steps": 1, "seed": seed}))
            wait_final(client, jobs[-1])
            assert stored_jobs(live) <= 3
        statuses = [client.get(f"{JOBS}/{job}").status_code for job in jobs]
    assert statuses == [404, 404, 200, 200, 200]


def test_finished_jobs_expire_after_the_ttl(make_server: Callable[..., Any]) -> None:
    live = make_server(job_ttl=1, job_grace=1, job_lease=2)  # a durable store prunes at its tick: lease / 3
    with httpx.Client(base_url=live.url, timeout=60) as client:
        job = submit(client, {**BODY, "num_inference_steps": 1})
        state = wait_final(client, job)
        assert state["status"] == "succeeded"
        # Nobody asks for it: the periodic prune drops it from the store.
        wait = wait_for_len(live, 0, timeout=30)
        assert wait, "the expired job was never pruned"
        assert_envelope(client.get(f"{JOBS}/{job}"), 404)
        # The images follow their own retention (--image-ttl), not the job's.
        assert client.get(state["result"]["response"][0]).status_code == 200


def test_a_finished_job_outlives_any_churn_for_its_grace(make_server: Callable[..., Any]) -> None:
    live = make_server(max_jobs=3, job_grace=60, max_steps=1000)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        victim = submit(client, {**BODY, "num_inference_steps": 1})
        assert wait_final(client, victim)["status"] == "succeeded"
        for _ in range(6):  # someone else's POST + DELETE pairs: they make room among their own cancelled jobs
            churn = submit(client, BLOCKER)
            assert client.delete(f"{JOBS}/{churn}").json()["status"] == "cancelled"
            assert client.get(f"{JOBS}/{victim}").status_code == 200
        others = [submit(client, {**BODY, "num_inference_steps": 1, "seed": seed}) for seed in (1, 2)]
        for job in others:
            wait_final(client, job)
        refused = client.post(JOBS, json=BODY)  # full of jobs within their grace: none may go
        assert [client.get(f"{JOBS}/{job}").status_code for job in (victim, *others)] == [200, 200, 200]
    error = assert_envelope(refused, 503)
    assert (error["type"], error["code"]) == ("overloaded_error", "too_many_jobs") and "--job-grace" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_a_finished_job_may_make_room_once_its_grace_has_passed(make_server: Callable[..., Any]) -> None:
    live = make_server(max_jobs=2, job_grace=1)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        jobs = [submit(client, {**BODY, "num_inference_steps": 1, "seed": seed}) for seed in (1, 2)]
        for job in jobs:
            wait_final(client, job)
        refused = client.post(JOBS, json=BODY)
        time.sleep(1.2)  # the oldest's grace has passed: it makes room
        admitted = client.post(JOBS, json=BODY)
        statuses = [client.get(f"{JOBS}/{job}").status_code for job in jobs]
    assert assert_envelope(refused, 503)["code"] == "too_many_jobs" and refused.headers["retry-after"] == "1"
    assert admitted.status_code == 202 and statuses == [404, 200]


def wait_for_len(live: Any, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while stored_jobs(live) != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_jobs_need_the_api_key(make_server: Callable[..., Any]) -> None:
    live = make_server(api_key="sesame")
    key = {"Authorization": "Bearer sesame"}
    with httpx.Client(base_url=live.url, timeout=60) as client:
        assert assert_envelope(client.post(JOBS, json=BODY), 401)["code"] == "invalid_api_key"
        job = client.post(JOBS, json=BODY, headers=key).json()["id"]
        for method, path in (("GET", job), ("GET", f"{job}/events"), ("DELETE", job)):
            assert_envelope(client.request(method, f"{JOBS}/{path}"), 401)
        client.headers.update(key)
        assert follow(client, job)[-1][1]["status"] == "succeeded"


def test_a_job_stopped_by_the_drain_fails_with_the_draining_envelope(spawn_server: Callable[..., Any]) -> None:
    """The memory store's drain (a durable store hands the job back instead: tests/test_job_stores.py)."""
    server = spawn_server("--job-store", "memory", "--shutdown-timeout", "1", "--max-steps", "1000").wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, BLOCKER)
        events = []
        with client.stream("GET", f"{JOBS}/{job}/events") as response:
            for event in read_events(response):
                events.append(event)
                if event[0] == "step" and event[1]["step"] == 2:
                    server.proc.send_signal(signal.SIGTERM)  # the job runs on past the drain's timeout
    assert server.proc.wait(timeout=60) == 0
    done = events[-1]
    assert done[0] == "done" and done[1]["status"] == "failed", done
    assert done[1]["error"] == {
        "message": "The server is draining.",
        "type": "unavailable",
        "param": None,
        "code": "draining",
    }
    log = server.log()
    assert "Traceback" not in log and "Task was destroyed" not in log and "never retrieved" not in log, log


def test_openapi_documents_the_jobs_with_the_configured_limits(make_server: Callable[..., Any]) -> None:
    live = make_server(max_steps=7, default_steps=2, max_image_size=256)
    document = httpx.get(f"{live.url}/openapi.json").json()
    body = document["components"]["schemas"]["JobRequest"]["properties"]
    assert body["num_inference_steps"]["anyOf"][0]["maximum"] == 7 and body["width"]["anyOf"][0]["maximum"] == 256
    assert body["preview_every"]["minimum"] == 0
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events"} <= set(document["paths"])
    assert set(document["paths"]["/api/jobs/{job_id}"]) == {"get", "delete"}


def test_a_page_on_an_allowed_origin_may_cancel_a_job(make_server: Callable[..., Any]) -> None:
    origin = "https://app.example"
    live = make_server(cors_origins=origin)
    preflight = httpx.options(
        f"{live.url}{JOBS}/some-id",
        headers={"Origin": origin, "Access-Control-Request-Method": "DELETE"},
        timeout=30,
    )
    assert preflight.status_code == 200 and "DELETE" in preflight.headers["access-control-allow-methods"]
    created = httpx.post(f"{live.url}{JOBS}", json=BODY, headers={"Origin": origin}, timeout=30)
    assert "location" in created.headers["access-control-expose-headers"].lower()


def test_an_idle_event_stream_outlasts_the_connection_timeouts(make_server: Callable[..., Any]) -> None:
    live = make_server(max_concurrency=1, max_steps=1000, keep_alive_timeout=1, receive_timeout=1)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        blocker = submit(client, BLOCKER)
        job = submit(client, BODY)
        events = []
        with client.stream("GET", f"{JOBS}/{job}/events") as response:
            for event in read_events(response):
                events.append(event)
                if len(events) == 1:
                    time.sleep(2.5)  # nothing happens to a queued job: the stream stays open regardless
                    client.delete(f"{JOBS}/{blocker}")
    assert events[0] == ("queued", {"position": 1}) and events[-1][1]["status"] == "succeeded"


def test_head_on_a_running_jobs_events_answers_headers_and_ends(make_server: Callable[..., Any]) -> None:
    live = make_server(max_steps=1000, job_store="memory")  # its subscribers are looked at below
    with httpx.Client(base_url=live.url, timeout=60) as client:
        job = submit(client, BLOCKER)  # runs for minutes unless cancelled
        wait_for(client, job, lambda state: state["step"] >= 1)
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # A HEAD, and a request pipelined behind it on the same connection: both are answered now.
            started = time.monotonic()
            sock.sendall(
                f"HEAD {JOBS}/{job}/events HTTP/1.1\r\nHost: a\r\n\r\n".encode()
                + b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            raw = b""
            while chunk := sock.recv(65536):  # until the server closes, after /health (10 s at most)
                raw += chunk
            elapsed = time.monotonic() - started
        assert client.get(f"{JOBS}/{job}").json()["status"] == "running"  # the HEAD did not wait for the end
        client.delete(f"{JOBS}/{job}")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/event-stream" in head.lower(), raw[:500]
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b'{"status":"ok"}'), rest[:500]
    assert elapsed < 5, elapsed
    assert not live.app.state.jobs.get(job).subscribers  # the HEAD's subscription ended with it


def test_cancelled_jobs_are_counted_as_cancelled_not_disconnected(make_server: Callable[..., Any]) -> None:
    live = make_server(max_concurrency=1, max_steps=1000)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        running = submit(client, BLOCKER)
        wait_for(client, running, lambda state: state["step"] >= 1)
        queued = submit(client, BODY)
        for job in (queued, running):  # one cancelled while queued, one while running
            assert client.delete(f"{JOBS}/{job}").json()["status"] == "cancelled"
        # A client that really leaves: its request is counted as disconnected, as before.
        with pytest.raises(httpx.ReadTimeout):
            client.post(NATIVE, json=BLOCKER, timeout=1)
        wait_idle(live.engine)
        deadline = time.monotonic() + 30
        while (counts := client.get("/api/status").json()["requests"])["disconnected"] < 1:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
    assert (counts["cancelled"], counts["disconnected"], counts["total"]) == (2, 1, 3), counts
