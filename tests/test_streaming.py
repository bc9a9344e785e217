"""OpenAI streaming (api/streaming.py): the real ``openai`` client against a real uvicorn on loopback, both engines."""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import torch
from http_helpers import OPENAI, assert_envelope, pixels

from api.streaming import preview_interval

REPO = Path(__file__).resolve().parent.parent

ENGINES = ["threads", "step"]
SIZE = "96x64"  # not square: the events' size and the images' must say width x height in that order


def client_for(live: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)


def stream_events(live: Any, steps: int, seed: int = 5, **params: Any) -> list[Any]:
    """Every event of one streamed generation, as the openai client parses them."""
    params = {"size": SIZE, **params}
    stream = client_for(live).images.generate(
        model="sd3",
        prompt="a lighthouse at dusk",
        stream=True,
        **params,
        extra_body={"num_inference_steps": steps, "seed": seed},
    )
    return list(stream)


def plain_images(live: Any, steps: int, seed: int = 5, **params: Any) -> list[Any]:
    """The pixels of the same request answered without streaming."""
    result = client_for(live).images.generate(
        model="sd3",
        prompt="a lighthouse at dusk",
        size=SIZE,  # type: ignore[arg-type]
        response_format="b64_json",
        **params,
        extra_body={"num_inference_steps": steps, "seed": seed},
    )
    return [pixels(base64.b64decode(item.b64_json or "")) for item in result.data]


def decoded(event: Any) -> Any:
    return pixels(base64.b64decode(event.b64_json, validate=True))


class HeldTransformer:
    """A private copy of the tiny transformer whose forward calls (one per step) can be slowed, or fail from the
    ``fail_at``-th call on (every call after it fails too: the step engine retries a batch that ran out of memory).
    Armed once the server is ready: the step engine's start-up calibration passes are neither slowed nor counted."""

    def __init__(self, pipeline: Any, delay: float = 0.0, fail_at: int | None = None, error: type = RuntimeError):
        self.module = copy.deepcopy(pipeline.transformer)
        self.module.register_forward_pre_hook(self._before)
        self.delay, self.fail_at, self.error = delay, fail_at, error
        self.calls = 0
        self.armed = False
        self._lock = threading.Lock()

    def _before(self, module: Any, args: Any) -> None:
        if not self.armed:
            return
        with self._lock:
            self.calls += 1
            calls = self.calls
        if self.fail_at is not None and calls >= self.fail_at:
            raise self.error("injected failure /secret/path")
        time.sleep(self.delay)


@pytest.fixture
def held(make_server: Callable[..., Any], tiny_pipeline: Any) -> Callable[..., tuple[Any, HeldTransformer]]:
    """Factory: held(transformer options, **settings) -> (live server, HeldTransformer) serving a pipeline with it."""
    from diffusers import StableDiffusion3Pipeline

    def make(delay: float = 0.0, fail_at: int | None = None, error: type = RuntimeError, **settings: Any) -> Any:
        fault = HeldTransformer(tiny_pipeline, delay, fail_at, error)
        pipe = StableDiffusion3Pipeline(**{**tiny_pipeline.components, "transformer": fault.module})
        loader = lambda s: SimpleNamespace(pipeline=pipe, device=torch.device("cpu"))  # noqa: E731
        live = make_server(loader=loader, **settings)  # ready: loaded (and, on the step engine, calibrated)
        fault.armed = True
        return live, fault

    return make


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.02)


def sse(response: httpx.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each event of an SSE answer, as they arrive."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: ") :])
            name = None


# -- the partial images and the final image -------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_partial_images_then_the_completed_image_same_as_unstreamed(make_server: Callable[..., Any], engine: str):
    live = make_server(engine=engine)
    events = stream_events(live, steps=9, partial_images=2)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partials, completed = events[:2], events[2]
    assert [event.partial_image_index for event in partials] == [0, 1]
    for event in events:
        assert event.size == SIZE and event.output_format == "png"
        assert event.quality == "auto" and event.background == "opaque" and event.created_at > 0
        assert decoded(event)[0] == (96, 64)  # partials are upscaled to the size they report
    assert completed.usage.total_tokens == 0 and completed.usage.input_tokens_details.text_tokens == 0
    # The final image is the one the same request gets without streaming; the partials are other pictures.
    assert [decoded(completed)] == plain_images(live, steps=9)
    assert decoded(partials[0]) != decoded(completed) and decoded(partials[0]) != decoded(partials[1])


def test_streamed_images_come_in_the_requested_output_format(make_server: Callable[..., Any]) -> None:
    from PIL import Image

    live = make_server()
    events = stream_events(live, steps=6, partial_images=1, output_format="webp", output_compression=20)
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    for event in events:
        assert event.output_format == "webp"
        with Image.open(io.BytesIO(base64.b64decode(event.b64_json))) as image:
            assert image.format == "WEBP" and image.size == (96, 64)


@pytest.mark.parametrize("engine", ENGINES)
def test_n2_streams_both_images_in_order(make_server: Callable[..., Any], engine: str) -> None:
    live = make_server(engine=engine)
    events = stream_events(live, steps=8, n=2, partial_images=2)
    kinds = [(event.type.rsplit(".", 1)[1], getattr(event, "partial_image_index", None)) for event in events]
    # 8 steps, 2 partials: previews after steps 3 and 6 (every 3); each round has one partial per image.
    assert kinds == [("partial_image", 0)] * 2 + [("partial_image", 1)] * 2 + [("completed", None)] * 2
    completed = [decoded(event) for event in events[-2:]]
    assert completed == plain_images(live, steps=8, n=2)  # image order kept
    assert completed[0] != completed[1]


def test_zero_partials_and_fewer_steps_than_partials(make_server: Callable[..., Any]) -> None:
    live = make_server()
    assert [event.type for event in stream_events(live, steps=3, partial_images=0)] == ["image_generation.completed"]
    assert [event.type for event in stream_events(live, steps=3)] == ["image_generation.completed"]
    # Two steps leave room for one preview only (never one after the last step): OpenAI allows fewer partials.
    events = stream_events(live, steps=2, partial_images=3)
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]


def test_preview_interval_spreads_partials_before_the_last_step() -> None:
    for steps in range(1, 60):
        for partials in range(4):
            every = preview_interval(steps, partials)
            due = [done for done in range(1, steps) if every and done % every == 0]  # the engine's rule
            sent = due[:partials]  # the stream's cap
            assert len(sent) == min(partials, steps - 1), (steps, partials, due)
            if sent and len(sent) == partials:  # spread: the last one near the p / (p + 1) point of the run
                assert sent[-1] >= partials * steps / (partials + 1) - partials, (steps, partials, due)
    assert preview_interval(28, 2) == 10 and preview_interval(30, 2) == 10 and preview_interval(1, 3) == 0
    assert preview_interval(9, 3) == 2 and preview_interval(28, 3) == 7


# -- headers, validation, errors before the stream ------------------------------------------------------


def test_stream_headers_and_stream_false(make_server: Callable[..., Any]) -> None:
    live = make_server()
    body = {"prompt": "a fox", "num_inference_steps": 2, "seed": 42, "stream": True, "partial_images": 1}
    with httpx.stream("POST", live.url + OPENAI, json=body, headers={"X-Request-ID": "stream-1"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-seed"] == "42" and r.headers["x-request-id"] == "stream-1"
        assert r.headers["cache-control"] == "no-cache"
        names = [name for name, _ in sse(r)]
    assert names == ["image_generation.partial_image", "image_generation.completed"]
    plain = httpx.post(live.url + OPENAI, json={**body, "stream": False}, timeout=60)
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    assert set(plain.json()) == {"created", "data", "output_format", "size"} and plain.headers["x-seed"] == "42"


def test_bad_requests_are_envelopes_before_any_stream(make_server: Callable[..., Any]) -> None:
    live = make_server()
    base = {"prompt": "a fox", "stream": True}
    for partial_images in (-1, 4, "2", 1.5):
        error = assert_envelope(httpx.post(live.url + OPENAI, json={**base, "partial_images": partial_images}), 400)
        assert error["param"] == "partial_images"
    assert (
        "between 0 and 3"
        in assert_envelope(httpx.post(live.url + OPENAI, json={**base, "partial_images": 4}), 400)["message"]
    )
    assert assert_envelope(httpx.post(live.url + OPENAI, json={**base, "size": "100x100"}), 400)["param"] == "size"
    assert assert_envelope(httpx.post(live.url + OPENAI, json={**base, "stream": "yes"}), 400)["param"] == "stream"


def test_a_full_queue_is_a_503_envelope_not_a_stream(held: Callable[..., Any]) -> None:
    live, _ = held(delay=0.05, max_concurrency=1, max_queue=0)
    body = {"prompt": "a fox", "num_inference_steps": 40, "stream": True}
    with httpx.stream("POST", live.url + OPENAI, json=body, timeout=60) as first:
        assert first.status_code == 200  # running: its stream has started
        refused = httpx.post(live.url + OPENAI, json=body, timeout=60)
        assert assert_envelope(refused, 503)["code"] == "queue_full" and "retry-after" in refused.headers
        assert [name for name, _ in sse(first)] == ["image_generation.completed"]


# -- failures after the stream started, and clients that leave -----------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("error", "status_type", "code"),
    [(RuntimeError, "server_error", "internal_error"), (MemoryError, "out_of_memory", "out_of_memory")],
)
def test_a_failure_mid_stream_is_an_error_event_the_client_raises(
    held: Callable[..., Any], engine: str, error: type, status_type: str, code: str
) -> None:
    live, _ = held(fail_at=5, error=error, engine=engine)
    received = []
    with pytest.raises(openai.APIError) as raised:
        for event in client_for(live).images.generate(
            prompt="a fox", stream=True, partial_images=2, size="64x64", extra_body={"num_inference_steps": 9}
        ):
            received.append(event.type)
    assert received == ["image_generation.partial_image"]  # the preview after step 3, then step 5 failed
    assert not isinstance(raised.value, openai.APIStatusError)  # raised from the stream's error event
    assert raised.value.type == status_type and raised.value.code == code
    assert "secret" not in raised.value.message and "injected" not in raised.value.message
    wait_until(lambda: live.engine.active == 0, "the slot is free")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_deadline_mid_stream_is_a_timeout_error_event(held: Callable[..., Any], engine: str) -> None:
    live, fault = held(delay=0.05, request_timeout=1, max_steps=1000, engine=engine)
    with pytest.raises(openai.APIError) as raised:
        list(client_for(live).images.generate(prompt="a fox", stream=True, extra_body={"num_inference_steps": 1000}))
    assert raised.value.code == "timeout" and raised.value.type == "timeout_error"
    wait_until(lambda: live.engine.active == 0, "the slot is free")
    assert fault.calls < 1000


@pytest.mark.parametrize("engine", ENGINES)
def test_disconnect_mid_stream_stops_the_generation_and_frees_the_slot(held: Callable[..., Any], engine: str):
    live, fault = held(delay=0.05, max_concurrency=1, engine=engine)
    body = {"prompt": "a fox", "num_inference_steps": 100, "partial_images": 3, "stream": True}
    with httpx.stream("POST", live.url + OPENAI, json=body, timeout=60) as response:
        name, data = next(sse(response))  # the first partial (after step 25): the generation is mid-way
        assert name == data["type"] == "image_generation.partial_image"
    wait_until(lambda: live.engine.active == 0, "the generation stopped after the client left")
    calls = fault.calls
    assert calls < 100 and live.engine.stats["disconnected"] == 1
    # The freed slot serves the next request at once (one slot only).
    fault.delay = 0
    assert [event.type for event in stream_events(live, steps=2)] == ["image_generation.completed"]


def test_the_end_of_a_drain_mid_stream_is_a_draining_error_event(spawn_server: Callable[..., Any]) -> None:
    proc = spawn_server("--shutdown-timeout", "1", "--max-steps", "1000").wait_ready()
    body = {"prompt": "a fox", "num_inference_steps": 1000, "size": "256x256", "partial_images": 3, "stream": True}
    with httpx.stream("POST", proc.url + OPENAI, json=body, timeout=60) as response:
        assert response.status_code == 200  # generating: the stream has started
        proc.proc.send_signal(signal.SIGTERM)
        events = list(sse(response))
    # Whatever partials came first, the stream ended with the error, not silently, once the drain's second passed.
    name, data = events[-1]
    assert name == "error" and data["error"]["code"] == "draining" and data["error"]["type"] == "unavailable"
    assert all(name == "image_generation.partial_image" for name, _ in events[:-1])
    assert proc.proc.wait(timeout=60) == 0
    assert "Traceback" not in proc.log()


def test_bench_previews_stream_prints_the_cost_per_partial_image(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_previews", REPO / "bench" / "previews.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--stream", "--preset", "random:tiny", "--sizes", "64,96", "--repeats", "1"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "x" in line.split("|")[0]]
    assert [row[0].strip() for row in rows] == ["64x64", "96x96"]
    for row in rows:
        projection, upscale, encode, total = (float(cell) for cell in row[1:5])
        assert total == pytest.approx(projection + upscale + encode, abs=2e-4) and float(row[5]) > 0
