"""Streams under load: concurrent OpenAI streams mixed with plain requests and clients that leave mid-stream.

Nothing is lost (every request ends in exactly one outcome the client saw), every stream that starts ends in its
completed images or one error event, and the server is idle at the end with its counters adding up.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

OPENAI = "/v1/images/generations"
STREAMS, PLAIN, DROPS = 16, 8, 6
PARALLEL = 8  # clients at once: one more than the slots plus the queue (7), so some are turned away and retry
RETRIES = 50
# A dropping client leaves after the first partial (step 25 of 100): the generation has most of its steps ahead.
DROP = {"num_inference_steps": 100, "partial_images": 3}


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The data of each SSE event (its ``event:`` name must be its type)."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
            assert data["type"] == name, (name, data)
            yield data


def _size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True))).size


def _stream(client: httpx.Client, body: dict[str, Any], drop: bool) -> str:
    """One streamed request; its outcome: 'completed', 'error:<code>', 'dropped', or '503:<code>'."""
    with client.stream("POST", OPENAI, json=body) as response:
        if response.status_code != 200:
            response.read()
            assert response.status_code == 503, response.text
            return f"503:{response.json()['error']['code']}"
        side, n, partials = int(body["size"].split("x")[0]), body["n"], body["partial_images"]
        seen: list[str] = []
        for data in _events(response):
            if drop:
                return "dropped"  # leave after the first event: the generation must stop
            if data["type"] == "error":
                assert set(data["error"]) == {"message", "type", "param", "code"}
                assert seen.count("completed") == 0
                return f"error:{data['error']['code']}"
            kind = data["type"].rsplit(".", 1)[1]
            assert "completed" not in seen or kind == "completed", "a partial after a completed image"
            assert _size(data["b64_json"]) == (side, side) and data["size"] == f"{side}x{side}"
            if kind == "partial_image":
                assert data["partial_image_index"] == seen.count("partial_image") // n < partials
            seen.append(kind)
        if drop:
            return "dropped"  # it finished before the first event could be read
        assert seen.count("completed") == n, seen  # the stream ended with every image, never silently
        return "completed"


def _plain(client: httpx.Client, body: dict[str, Any]) -> str:
    answer = client.post(OPENAI, json={**body, "stream": False, "response_format": "b64_json"})
    if answer.status_code == 503:
        return f"503:{answer.json()['error']['code']}"
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == body["n"]
    return "plain"


def _plan(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    work = [("stream", {})] * STREAMS + [("plain", {})] * PLAIN + [("drop", DROP)] * DROPS
    rng.shuffle(work)
    plan = []
    for kind, extra in work:
        side = rng.choice((32, 48, 64))
        body = {
            "prompt": f"load {rng.randrange(4)}",  # a few repeats: the prompt cache is shared under load too
            "n": rng.choice((1, 1, 2)),
            "size": f"{side}x{side}",
            "num_inference_steps": rng.randrange(2, 12),
            "partial_images": rng.randrange(4),
            "stream": True,
            "seed": rng.randrange(2**32),
            **extra,
        }
        plan.append((kind, body))
    return plan


def _run(url: str, kind: str, body: dict[str, Any]) -> tuple[str, int]:
    """One planned request, retried (bounded) while refused as overloaded: (its outcome, the refusals it got)."""
    with httpx.Client(base_url=url, timeout=120) as client:
        for refusals in range(RETRIES):
            outcome = _plain(client, body) if kind == "plain" else _stream(client, body, drop=kind == "drop")
            if not outcome.startswith("503:"):
                return outcome, refusals
            time.sleep(0.1)  # what Retry-After asks for, shortened: the queue moves within a generation
        return outcome, RETRIES


def _wait_idle(live: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while live.engine.active or live.engine.queued:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("engine", ["threads", "step"])
def test_streams_plain_requests_and_drops_under_load(make_server: Callable[..., Any], engine: str) -> None:
    live = make_server(engine=engine, max_concurrency=2, max_queue=5)
    plan = _plan(random.Random(11))
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(_run, live.url, kind, body) for kind, body in plan]
        results = [future.result(timeout=300) for future in futures]
    outcomes = Counter(outcome for outcome, _ in results)
    refused = sum(refusals for _, refusals in results)
    assert _wait_idle(live), f"not idle: {live.engine.active} running, {live.engine.queued} queued"
    stats = live.engine.stats
    assert set(outcomes) <= {"completed", "plain", "dropped"}, outcomes  # every request served: no error, no loss
    assert outcomes == Counter({"completed": STREAMS, "plain": PLAIN, "dropped": DROPS}), outcomes
    assert stats["total"] == len(plan) + refused and stats["rejected"] == refused, (stats, refused)
    assert stats["failed"] == stats["timed_out"] == stats["out_of_memory"] == 0, stats
    # Every dropped client stopped its generation, unless it had finished by then.
    assert stats["completed"] + stats["disconnected"] == len(plan), stats
    assert stats["disconnected"] > 0, "no client left mid-stream"
    with httpx.Client(base_url=live.url, timeout=120) as client:  # still serving
        assert _plain(client, {"prompt": "after", "n": 1, "num_inference_steps": 2}) == "plain"
