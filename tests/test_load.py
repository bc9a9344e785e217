"""Bounded load through real HTTP: valid, invalid and abandoned requests, OpenAI streams, jobs followed to their end
and jobs cancelled, mixed; nothing lost (every stream ends with its images or an error event, every job in a final
state), nothing leaked."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from jobs_helpers import stored_statuses

from utils.image_store import IMAGE_NAME

logger = logging.getLogger(__name__)

NATIVE = "/api/diffusers/inference"
OPENAI = "/v1/images/generations"
VALID, INVALID, ABANDONED = 330, 110, 70  # 510 requests
JOBS_FOLLOWED, JOBS_CANCELLED = 40, 30  # and 70 jobs
STREAMS = 30  # and 30 streamed OpenAI requests
JOBS = "/api/jobs"
FINAL = {"succeeded", "failed", "cancelled"}
PARALLEL = 16  # clients at once: more than one slot plus the queue, so some are turned away
INVALID_BODIES: list[tuple[str, bytes]] = [
    (NATIVE, b'{"prompt": "x", '),
    (NATIVE, b'{"prompt": 5}'),
    (NATIVE, b'{"prompt": "x", "num_inference_steps": 0}'),
    (NATIVE, b'{"prompt": "x", "height": 33}'),
    (NATIVE, b'{"prompt": "x", "num_images_per_prompt": 99}'),
    (NATIVE, b'["x"]'),
    (OPENAI, b'{"prompt": "x", "size": "big"}'),
    (OPENAI, b'{"prompt": "", "n": 1}'),
    (OPENAI, b'{"prompt": "x", "response_format": "gif"}'),
]


@dataclass
class Tally:
    """What the clients saw; every valid request lands in exactly one bucket."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    stored_images: int = 0  # images answered as URLs (b64 ones are never written to disk)
    problems: list[str] = field(default_factory=list)
    abandoned: int = 0
    jobs: dict[str, str] = field(default_factory=dict)  # id -> final status, for every job accepted (202)
    streams: Counter[str] = field(default_factory=Counter)  # how each accepted stream ended: "completed", "timeout"


def _valid(rng: random.Random) -> tuple[str, dict[str, Any]]:
    n = rng.choice((1, 1, 2))
    steps = rng.choice((1, 2))
    if rng.random() < 0.5:
        return NATIVE, {
            "prompt": "load",
            "num_inference_steps": steps,
            "height": 32,
            "width": 32,
            "num_images_per_prompt": n,
        }
    fmt = rng.choice(("url", "b64_json"))
    return OPENAI, {"prompt": "load", "size": "32x32", "n": n, "num_inference_steps": steps, "response_format": fmt}


async def _send_valid(client: httpx.AsyncClient, path: str, payload: dict[str, Any], tally: Tally) -> None:
    try:
        answer = await client.post(path, json=payload)
    except httpx.HTTPError as exc:  # a lost request: no answer at all
        tally.problems.append(f"valid {path}: {type(exc).__name__}")
        return
    tally.statuses[("valid", answer.status_code)] += 1
    if answer.status_code == 200:
        body = answer.json()
        urls = body["response"] if path == NATIVE else [d["url"] for d in body["data"] if "url" in d]
        expected = payload.get("num_images_per_prompt", payload.get("n", 1))
        if len(body.get("response", body.get("data", []))) != expected:
            tally.problems.append(f"valid {path}: {expected} image(s) asked, answer {body}")
        tally.stored_images += len(urls)
    elif answer.status_code in (503, 504):
        error = answer.json()["error"]
        if answer.status_code == 503 and (error["type"] != "overloaded_error" or "retry-after" not in answer.headers):
            tally.problems.append(f"valid {path}: 503 that is not a clean overload answer: {answer.text}")
    else:
        tally.problems.append(f"valid {path}: {answer.status_code} {answer.text[:200]}")


async def _send_invalid(client: httpx.AsyncClient, path: str, content: bytes, tally: Tally) -> None:
    answer = await client.post(path, content=content, headers={"Content-Type": "application/json"})
    tally.statuses[("invalid", answer.status_code)] += 1
    if not 400 <= answer.status_code < 500 or set(answer.json()) != {"error"}:
        tally.problems.append(f"invalid {content!r}: {answer.status_code} {answer.text[:200]}")


async def _send_abandoned(url: str, rng: random.Random, tally: Tally) -> None:
    """A client that sends a long request, then closes its socket without reading the answer."""
    parts = urlsplit(url)
    payload = json.dumps({"prompt": "gone", "num_inference_steps": 200, "height": 64, "width": 64}).encode()
    head = (
        f"POST {NATIVE} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(head.encode() + payload)
    await writer.drain()
    # Far shorter than the generation takes, so it is cut off queued or mid-generation, never finished.
    await asyncio.sleep(rng.uniform(0.02, 0.3))
    writer.close()
    await writer.wait_closed()
    tally.abandoned += 1


async def _send_job(client: httpx.AsyncClient, rng: random.Random, tally: Tally, cancel: bool) -> None:
    """A job, followed through its event stream (or by polling) to its end, or cancelled after a random wait."""
    kind = "cancelled job" if cancel else "job"
    n = rng.choice((1, 2))
    payload = {"prompt": "job", "num_inference_steps": rng.choice((2, 6)), "height": 32, "width": 32, "seed": 3}
    payload.update(num_images_per_prompt=n, preview_every=rng.choice((0, 1)))
    answer = await client.post(JOBS, json=payload)
    tally.statuses[(kind, answer.status_code)] += 1
    if answer.status_code == 503:
        if answer.json()["error"]["type"] != "overloaded_error" or "retry-after" not in answer.headers:
            tally.problems.append(f"{kind}: 503 that is not a clean overload answer: {answer.text}")
        return
    if answer.status_code != 202:
        tally.problems.append(f"{kind}: {answer.status_code} {answer.text[:200]}")
        return
    job = answer.json()["id"]
    tally.jobs[job] = "accepted"
    if cancel:
        await asyncio.sleep(rng.uniform(0, 0.3))  # cancelled queued, running, or (rarely) already finished
        state = (await client.delete(f"{JOBS}/{job}")).json()
    elif rng.random() < 0.5:
        state = await _follow(client, job)
    else:
        state = (await client.get(f"{JOBS}/{job}")).json()
        while state["status"] not in FINAL:
            await asyncio.sleep(0.05)
            state = (await client.get(f"{JOBS}/{job}")).json()
    tally.jobs[job] = state["status"]
    if state["status"] == "succeeded":
        if len(state["result"]["response"]) != n:
            tally.problems.append(f"{kind}: {n} image(s) asked, result {state['result']}")
        tally.stored_images += len(state["result"]["response"])
    elif state["status"] == "failed" and state["error"]["code"] != "timeout":
        tally.problems.append(f"{kind}: failed: {state['error']}")


async def _send_stream(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    """An OpenAI stream read to its end: its partial images, then one completed event per image, or an error event."""
    n = rng.choice((1, 2))
    payload = {"prompt": "stream", "size": "32x32", "n": n, "num_inference_steps": rng.choice((2, 4)), "stream": True}
    payload["partial_images"] = rng.choice((0, 1, 2))
    events: list[tuple[str, dict[str, Any]]] = []
    async with client.stream("POST", OPENAI, json=payload) as response:
        tally.statuses[("stream", response.status_code)] += 1
        if response.status_code != 200:
            error = json.loads(await response.aread())["error"]
            if (
                response.status_code != 503
                or error["type"] != "overloaded_error"
                or "retry-after" not in response.headers
            ):
                tally.problems.append(f"stream: {response.status_code} that is not a clean overload answer: {error}")
            return
        name = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    names = [name for name, _ in events]
    completed = names.count("image_generation.completed")
    partials = names[: len(names) - completed]
    if names and names[-1] == "error" and events[-1][1]["error"]["code"] == "timeout":
        tally.streams["timeout"] += 1
    elif completed == n and set(partials) <= {"image_generation.partial_image"} and names[-1:] != ["error"]:
        tally.streams["completed"] += 1
    else:
        tally.problems.append(f"stream: {n} image(s) asked, events {names}")


async def _follow(client: httpx.AsyncClient, job: str) -> dict[str, Any]:
    """The ``done`` event's job, read from the event stream."""
    async with client.stream("GET", f"{JOBS}/{job}/events") as response:
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name == "done":
                return json.loads(line[len("data: ") :])
    return {"status": "stream ended before done"}


async def _run_load(url: str, plan: list[str], seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    gate = asyncio.Semaphore(PARALLEL)
    limits = httpx.Limits(max_connections=PARALLEL, max_keepalive_connections=PARALLEL)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(kind: str) -> None:
            async with gate:
                if kind == "valid":
                    turned_away = tally.statuses[("valid", 503)]
                    await _send_valid(client, *_valid(rng), tally)
                    if tally.statuses[("valid", 503)] > turned_away:
                        # Back off as a client should after a 503 (scaled down from Retry-After): without it the
                        # turned-away clients spin and the run is nearly all 503s.
                        await asyncio.sleep(rng.uniform(0.05, 0.2))
                elif kind == "invalid":
                    await _send_invalid(client, *rng.choice(INVALID_BODIES), tally)
                elif kind in ("job", "cancelled job", "stream"):
                    turned_away = tally.statuses[(kind, 503)]
                    if kind == "stream":
                        await _send_stream(client, rng, tally)
                    else:
                        await _send_job(client, rng, tally, cancel=kind == "cancelled job")
                    if tally.statuses[(kind, 503)] > turned_away:
                        await asyncio.sleep(rng.uniform(0.05, 0.2))
                else:
                    await _send_abandoned(url, rng, tally)

        await asyncio.gather(*(one(kind) for kind in plan))
    return tally


def _wait_idle(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        state = httpx.get(url + "/api/status", timeout=30).json()
        if state["active_inferences"] == 0 and state["queued"] == 0:
            return state
        assert time.monotonic() < deadline, f"counters never went back to 0: {state}"
        time.sleep(0.05)


def _footprint() -> tuple[int, int]:
    gc.collect()
    return threading.active_count(), psutil.Process().memory_info().rss


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["threads", "step"])
def test_bounded_load_loses_nothing_and_leaks_nothing(make_server: Callable[..., Any], engine: str) -> None:
    live = make_server(
        engine=engine,
        max_concurrency=1 if engine == "threads" else 4,
        max_queue=10,
        request_timeout=30,
        max_steps=200,
        max_image_size=64,
        image_ttl=0,
        image_max_files=0,
    )
    image_dir = live.app.state.store.directory

    # Warm-up: the same mix, so that lazily created threads and caches exist before the baseline is taken.
    warm_plan = ["valid"] * 30 + ["invalid"] * 10 + ["abandoned"] * 5 + ["job"] * 5 + ["cancelled job"] * 5
    warm_plan += ["stream"] * 5
    random.Random(1).shuffle(warm_plan)
    warm = asyncio.run(_run_load(live.url, warm_plan, seed=1))
    assert warm.problems == []
    _wait_idle(live.url)
    warm_files = sum(1 for p in image_dir.iterdir() if IMAGE_NAME.match(p.name))
    assert warm_files == warm.stored_images
    before_stats = dict(httpx.get(live.url + "/api/status").json()["requests"])
    threads_before, rss_before = _footprint()

    plan = ["valid"] * VALID + ["invalid"] * INVALID + ["abandoned"] * ABANDONED
    plan += ["job"] * JOBS_FOLLOWED + ["cancelled job"] * JOBS_CANCELLED + ["stream"] * STREAMS
    random.Random(2).shuffle(plan)
    tally = asyncio.run(_run_load(live.url, plan, seed=2))
    state = _wait_idle(live.url)
    threads_after, rss_after = _footprint()

    valid = {code: n for (kind, code), n in tally.statuses.items() if kind == "valid"}
    invalid = sum(n for (kind, _), n in tally.statuses.items() if kind == "invalid")
    logger.info(
        "load: %d sent; valid %d (200: %d, 503: %d, 504: %d), invalid %d, abandoned %d, jobs %s, streams %s; "
        "threads %d -> %d, rss %.0f -> %.0f MiB",
        len(plan),
        VALID,
        valid.get(200, 0),
        valid.get(503, 0),
        valid.get(504, 0),
        invalid,
        tally.abandoned,
        dict(Counter(tally.jobs.values())),
        dict(tally.streams),
        threads_before,
        threads_after,
        rss_before / 2**20,
        rss_after / 2**20,
    )
    assert len(plan) >= 500
    assert tally.problems == [], tally.problems[:10]
    # Nothing lost: every valid request got a success or a clean overload/deadline answer.
    assert sum(valid.values()) == VALID and set(valid) <= {200, 503, 504}, valid
    assert valid.get(200, 0) > VALID // 4, f"too few successes to mean anything: {valid} {state}"
    assert invalid == INVALID and tally.abandoned == ABANDONED
    # Every job accepted ended in a final state, as its client saw it and as the server still tells; the rest were
    # turned away at once (503), never accepted to fail later.
    jobs = {kind: sum(n for (k, code), n in tally.statuses.items() if k == kind) for kind in ("job", "cancelled job")}
    assert jobs == {"job": JOBS_FOLLOWED, "cancelled job": JOBS_CANCELLED}, tally.statuses
    outcomes = Counter(tally.jobs.values())
    assert set(outcomes) <= FINAL, outcomes
    assert outcomes["cancelled"] >= 1 and outcomes["succeeded"] >= 1, outcomes  # how many: the load decides
    stored = stored_statuses(live)
    assert {job: stored.get(job) for job in tally.jobs} == tally.jobs
    assert set(stored.values()) <= FINAL, Counter(stored.values())
    # Every stream was answered: turned away at once (503), or accepted and ended with its images or an error event.
    streams = {code: n for (kind, code), n in tally.statuses.items() if kind == "stream"}
    assert sum(streams.values()) == STREAMS and set(streams) <= {200, 503}, streams
    assert sum(tally.streams.values()) == streams.get(200, 0), (tally.streams, streams)
    assert tally.streams["completed"] >= 1, tally.streams

    # Nothing leaked: counters at 0, one file per image answered as a URL, and no request thread or memory left.
    assert (state["active_inferences"], state["queued"]) == (0, 0)
    stats = state["requests"]
    delta = {k: stats[k] - before_stats[k] for k in stats}
    # No abandoned request ran to the end; a job cancelled as its generation ended is counted completed by the engine.
    finished = valid.get(200, 0) + outcomes["succeeded"] + tally.streams["completed"]
    assert finished <= delta["completed"] <= finished + outcomes["cancelled"], (delta, outcomes)
    assert delta["failed"] == delta["out_of_memory"] == 0, delta
    assert delta["disconnected"] >= 1, "no abandoned request was seen leaving"
    assert delta["total"] == sum(delta[k] for k in delta if k != "total"), delta
    files = sum(1 for p in image_dir.iterdir() if IMAGE_NAME.match(p.name))
    assert files - warm_files == tally.stored_images
    assert [p.name for p in image_dir.iterdir() if p.name.startswith(".tmp-")] == []
    assert threads_after <= threads_before + 2, (threads_before, threads_after)
    assert rss_after - rss_before < 100 * 2**20, (rss_before, rss_after)
