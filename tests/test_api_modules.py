"""The api/ package's modules, each tested alone: a router on a bare app, the limit checks, the error helpers.

The rest of the HTTP behaviour is tested end to end through create_app (test_api.py, test_hardening.py, ...).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import LiveServer
from fastapi import FastAPI
from http_helpers import assert_envelope

from api.errors import APIError, install_error_handlers, validation_message
from api.generation import to_generation
from api.loading import ModelGeometry
from api.models import ModelView, server_models
from api.routes import ops
from api.routes.openai import parse_size
from api.schemas import InferenceRequest
from api.settings import Settings


def test_the_ops_router_serves_alone_from_app_state(tmp_path) -> None:
    """Mounted on a bare app, the ops router needs nothing but app.state: proof the handlers close over nothing."""
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(ops.router)
    engine = SimpleNamespace(
        ready_reason=None,
        stats={"total": 3},
        active=1,
        queued=2,
        max_concurrency=4,
        pixels_running=4096,
        max_pixels=8192,
    )  # the attributes the routes read
    app.state.settings = Settings(model="random:tiny", image_dir=str(tmp_path))
    app.state.engine, app.state.loaded, app.state.load_error = None, None, None
    app.state.models, app.state.modelset = server_models(app.state.settings), None  # one model, as create_app sets
    app.state.store = []
    live = LiveServer(app)
    try:
        assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
        loading = httpx.get(f"{live.url}/ready")
        assert assert_envelope(loading, 503)["code"] == "loading"
        assert httpx.get(f"{live.url}/api/status").json()["device"] == "pending"

        app.state.engine = engine
        assert httpx.get(f"{live.url}/ready").json() == {"status": "ready", "model": "random:tiny"}
        status = httpx.get(f"{live.url}/api/status").json()
        assert (status["active_inferences"], status["queued"], status["max_concurrency"]) == (1, 2, 4)
        assert (status["pixels_running"], status["max_pixels_in_flight"]) == (4096, 8192)
        assert httpx.get(f"{live.url}/").json()["model"] == "random:tiny"
    finally:
        live.stop()


def _request(**settings: Any) -> Any:
    """What to_generation reads of a request: app.state (settings, the model's view: geometry, default guidance) and
    the request id."""
    configured = Settings(model="random:tiny", **settings)
    models = server_models(configured)
    view = ModelView(models.default, ModelGeometry(16, 64, 1024), 6.5, loaded=None)
    models.views[view.name] = view  # as the load publishes it
    state = SimpleNamespace(settings=configured, models=models, modelset=None, engine=object())
    return SimpleNamespace(app=SimpleNamespace(state=state), state=SimpleNamespace(request_id="rid"))


def _body(**fields: Any) -> InferenceRequest:
    return InferenceRequest(prompt="a fox", **fields)


def test_to_generation_resolves_defaults_and_draws_a_seed() -> None:
    generation = to_generation(_request(default_steps=7), _body(), {}, n=2, height=None, width=48)
    assert (generation.num_inference_steps, generation.num_images) == (7, 2)
    assert (generation.height, generation.width) == (64, 48)
    assert 0 <= generation.seed < 2**32 and generation.request_id == "rid"
    assert to_generation(_request(), _body(seed=5), {}, n=1, height=None, width=None).seed == 5
    assert generation.guidance_scale == 6.5  # the pipeline's default, resolved so the answer can report it
    assert to_generation(_request(), _body(guidance_scale=2.0), {}, n=1, height=None, width=None).guidance_scale == 2


@pytest.mark.parametrize(
    ("body", "n", "size", "param", "words"),
    [
        ({"num_inference_steps": 101}, 1, 64, "num_inference_steps", "between 1 and 100"),
        ({}, 11, 64, "num_images_per_prompt", "between 1 and 10"),
        ({}, 1, 8, "height", "between 16 and 1024 pixels"),
        ({}, 1, 1040, "height", "between 16 and 1024 pixels"),
        ({}, 1, 72, "height", "multiple of 16; try 64 or 80"),
        ({"prompt": " \t "}, 1, 64, "prompt", "must not be blank"),
    ],
)
def test_to_generation_names_the_api_field_and_the_limit(
    body: dict[str, Any], n: int, size: int, param: str, words: str
) -> None:
    names = {"steps": "num_inference_steps", "n": "num_images_per_prompt"}
    with pytest.raises(APIError) as caught:
        to_generation(_request(), InferenceRequest(**{"prompt": "a fox", **body}), names, n=n, height=size, width=64)
    assert caught.value.status == 400 and caught.value.param == param
    assert words in caught.value.message and caught.value.message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("size", "expected"), [(None, (None, None)), ("auto", (None, None)), ("96x64", (96, 64)), ("8x64", (8, 64))]
)
def test_parse_size(size: str | None, expected: tuple[int | None, int | None]) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["64", "64x", "x64", "64X64", "1e3x64"])
def test_parse_size_refuses_with_the_format(size: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_size(size)
    assert caught.value.param == "size" and caught.value.status == 400


def test_validation_messages_name_the_field_never_the_value() -> None:
    secret = "s3cret-value-" * 20
    message, param = validation_message(
        [{"type": "int_type", "loc": ("body", "seed"), "msg": "Input should be a valid integer", "input": secret}]
    )
    assert param == "seed" and message.startswith("seed: ") and "s3cret" not in message
    message, _ = validation_message([{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}] * 3)
    assert message == "prompt: this field is required (and 2 more problem(s))"


def test_sse_events_are_one_data_line_of_json() -> None:
    import json

    from api.sse import comment, sse_event

    raw = sse_event({"text": "two\nlines", "n": 1}, event="step", event_id=3)
    assert raw == b'event: step\nid: 3\ndata: {"text":"two\\nlines","n":1}\n\n'
    assert json.loads(raw.decode().split("data: ", 1)[1]) == {"text": "two\nlines", "n": 1}
    assert sse_event([1]) == b"data: [1]\n\n"
    assert comment("keep-alive") == b": keep-alive\n\n"
    with pytest.raises(ValueError):
        sse_event({}, event="bad\nname")


def test_usable_cores_honours_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from api.loading import usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores() == affinity
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray sets it for a replica with num_cpus=1
    assert usable_cores() == 1
    for ignored in ("", "0", "many", str(affinity + 8)):
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert usable_cores() == affinity


def test_the_miss_log_reports_a_burst_whole_at_most_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    """The first unanswered request is logged at once; the rest of a burst in one line when the period ends."""
    import asyncio
    import logging

    from api.misses import MissLog

    async def burst() -> None:
        log = MissLog("no route", every=0.05)
        for i in range(3):
            log.note(404, "GET", f"/nope/{i}")
        await asyncio.sleep(0.15)

    caplog.set_level(logging.INFO, logger="api.misses")
    asyncio.run(burst())
    lines = [record.getMessage() for record in caplog.records if record.name == "api.misses"]
    assert lines == [
        "no route: answered 404 for GET '/nope/0'",
        "no route: answered 2 requests since the last report, the latest 404 for GET '/nope/2'",
    ]
