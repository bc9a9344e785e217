"""Both engines behind the same HTTP layer: status figures, the prompt cache, deadlines on the step engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from http_helpers import NATIVE, assert_envelope, fetch_png, pixels

BODY = {"prompt": "a quiet harbour", "num_inference_steps": 2, "height": 32, "width": 32, "seed": 7}


def _images(client: httpx.Client, body: dict[str, Any]) -> list[Any]:
    answer = client.post(NATIVE, json=body)
    assert answer.status_code == 200, answer.text
    return [pixels(fetch_png(url, client)) for url in answer.json()["response"]]


@pytest.mark.parametrize("engine", ["threads", "step"])
def test_status_shows_the_engine_and_prompt_cache_hits(make_server: Callable[..., Any], engine: str) -> None:
    live = make_server(engine=engine, step_loops=0)  # the calibration chooses the loops
    with httpx.Client(base_url=live.url, timeout=120) as client:
        first = _images(client, BODY)
        again = _images(client, BODY)
        info = client.get("/api/status").json()["engine"]
    assert again == first  # the cached embeddings give the same image
    assert info["kind"] == engine
    # First request: the prompt and the empty negative prompt missed; the second request hit both.
    assert info["prompt_cache"] == {"capacity": 256, "entries": 2, "hits": 2, "misses": 2}
    if engine == "step":
        batching = info["batching"]
        assert info["max_batch_size"] == 32 and batching["passes"] == 2 * BODY["num_inference_steps"]
        # The cost table: the start-up calibration at the model's default size, and the size served since.
        calibrated = batching["costs"]["64x64"]
        assert calibrated["best_batch"] >= 1 and calibrated["passes"]["1"]["ms"] > 0
        assert set(batching["costs"]) == {"64x64", "32x32"}
        assert batching["loops"] == batching["calibration"]["loops"] >= 1


def test_step_loops_sets_the_loops_and_their_share_of_the_cores(make_server: Callable[..., Any]) -> None:
    from api.loading import usable_cores

    live = make_server(engine="step", step_loops=2)
    with httpx.Client(base_url=live.url, timeout=120) as client:
        assert len(_images(client, {**BODY, "num_images_per_prompt": 2})) == 2
        batching = client.get("/api/status").json()["engine"]["batching"]
    assert batching["loops"] == 2 and batching["threads_per_loop"] == max(1, usable_cores() // 2)
    assert set(batching["calibration"]["samples_per_s_by_loops"]) == {"2"}  # measured as it runs, not chosen


def test_threads_engine_images_are_the_same_with_and_without_the_cache(make_server: Callable[..., Any]) -> None:
    bodies = [BODY, {**BODY, "negative_prompt": "fog", "num_images_per_prompt": 2}, {**BODY, "guidance_scale": 1.0}]
    results = []
    for size in (0, 8):
        live = make_server(engine="threads", prompt_cache_size=size)
        with httpx.Client(base_url=live.url, timeout=120) as client:
            results.append([_images(client, body) for body in bodies])
    assert results[0] == results[1]


def test_step_engine_deadline_is_504_and_the_request_leaves_the_loop(make_server: Callable[..., Any]) -> None:
    live = make_server(engine="step", request_timeout=1, max_steps=1000)
    answer = httpx.post(live.url + NATIVE, json={**BODY, "num_inference_steps": 1000, "height": 256}, timeout=60)
    assert assert_envelope(answer, 504)["code"] == "timeout"
    deadline = time.monotonic() + 30
    while live.engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    passes = live.engine.runner.stats["passes"]
    assert live.engine.active == 0 and 0 < passes < 1000
    time.sleep(0.3)
    assert live.engine.runner.stats["passes"] == passes, "the loop went on stepping the abandoned request"
