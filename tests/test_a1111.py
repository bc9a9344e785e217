"""The AUTOMATIC1111 API (``/sdapi/v1``) on both engines: its images are the native API's, pixel for pixel on the
threads engine (the step engine: within its batching tolerance), for txt2img, img2img and ``<lora:name:weight>``;
progress moves while a request runs, interrupt and skip stop it at its next step.

One server per engine for the module, on a fresh random:tiny pipeline (adapters change a pipeline's modules) with
one adapter, one slot (so that a request's second image waits while its first runs: what skip acts on) and room for
long generations (the progress tests run up to 1000 steps of 32x32 and stop them early).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import LiveServer, tiny_loader, wait_ready
from http_helpers import NATIVE, assert_envelope, fetch_png, open_png
from lora_helpers import fresh_tiny, make_adapter
from PIL import Image

SIZE, STEPS = 32, 2
MAX_ABS, MEAN_ABS = 2, 0.01  # the step engine's tolerance (tests/test_step_engine.py)
TXT2IMG, IMG2IMG, PROGRESS = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("lora") / "ink", seed=1)


@pytest.fixture(scope="module", params=["threads", "step"])
def server(request: pytest.FixtureRequest, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from serverasync import Settings, create_app

    settings = Settings(
        model="random:tiny",
        image_dir=str(tmp_path_factory.mktemp("images")),
        engine=request.param,
        max_concurrency=1,
        step_loops=1,
        max_steps=1000,
        lora=[f"ink={adapter}"],
    )
    live = LiveServer(create_app(settings, loader=tiny_loader(fresh_tiny())))
    wait_ready(live.url)
    yield live
    live.stop()


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(open_png(data).convert("RGB"))


def _same(server: LiveServer, got: np.ndarray, want: np.ndarray, what: str) -> None:
    if server.engine.kind == "threads":
        np.testing.assert_array_equal(got, want, what)
        return
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (what, diff.max(), diff.mean())


def _native(server: LiveServer, **body: Any) -> np.ndarray:
    answer = httpx.post(server.url + NATIVE, json={"height": SIZE, "width": SIZE, **body}, timeout=120)
    assert answer.status_code == 200, answer.text
    return _rgb(fetch_png(answer.json()["response"][0]))


def _a1111(server: LiveServer, path: str, **body: Any) -> tuple[list[bytes], dict[str, Any]]:
    answer = httpx.post(server.url + path, json={"width": SIZE, "height": SIZE, **body}, timeout=120)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    assert set(payload) == {"images", "parameters", "info"}
    return [base64.b64decode(image, validate=True) for image in payload["images"]], json.loads(payload["info"])


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PHOTO = Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_txt2img_image_i_is_the_native_apis_image_for_seed_plus_i(server: LiveServer) -> None:
    body = {"prompt": "a harbour", "negative_prompt": "fog", "steps": STEPS, "cfg_scale": 4.5, "seed": 11}
    images, info = _a1111(server, TXT2IMG, **body, batch_size=2, n_iter=2)
    assert len(images) == 4 and info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    for i in (0, 3):
        want = _native(server, prompt="a harbour", negative_prompt="fog", num_inference_steps=STEPS,
                       guidance_scale=4.5, seed=11 + i)  # fmt: skip
        _same(server, _rgb(images[i]), want, f"image {i}")
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (SIZE, SIZE, STEPS, 4.5)
    assert info["sampler_name"] == "Euler" and info["sd_model_name"] == "random:tiny"
    assert info["infotexts"][3] == (
        "a harbour\nNegative prompt: fog\nSteps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 4.5, "
        'Seed: 14, Size: 32x32, Model: "random:tiny", Version: sd3-async-server'
    )


def test_img2img_maps_steps_and_denoising_strength_to_the_native_fields(server: LiveServer) -> None:
    body = {"prompt": "a boat", "steps": 4, "denoising_strength": 0.5, "seed": 3}
    [image], info = _a1111(server, IMG2IMG, **body, init_images=[f"data:image/png;base64,{_png(PHOTO)}"])
    want = _native(server, prompt="a boat", num_inference_steps=4, strength=0.5, seed=3, image=_png(PHOTO))
    _same(server, _rgb(image), want, "img2img")
    assert info["task"] == "image-to-image" and info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]


def test_img2img_with_a_mask_keeps_the_unmasked_pixels(server: LiveServer) -> None:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # the left half repaints
    [image], info = _a1111(server, IMG2IMG, prompt="a boat", steps=STEPS, seed=2, init_images=[_png(PHOTO)],
                           mask=_png(mask), mask_blur=0, denoising_strength=1.0)  # fmt: skip
    assert info["task"] == "inpainting"
    kept = (slice(None), slice(SIZE // 2 + 1, None))
    np.testing.assert_array_equal(_rgb(image)[kept], np.asarray(PHOTO)[kept])


def test_a_lora_tag_is_the_loras_field_and_unknown_ones_are_named(server: LiveServer) -> None:
    [image], info = _a1111(server, TXT2IMG, prompt="a kite, <lora:ink:0.8>", steps=STEPS, seed=4)
    want = _native(server, prompt="a kite, ", loras=[{"name": "ink", "scale": 0.8}], num_inference_steps=STEPS, seed=4)
    _same(server, _rgb(image), want, "<lora:ink:0.8>")
    base = _native(server, prompt="a kite, ", num_inference_steps=STEPS, seed=4)
    assert not np.array_equal(want, base)  # the adapter changes the image
    assert info["loras"] == [{"name": "ink", "scale": 0.8}] and info["prompt"] == "a kite, <lora:ink:0.8>"
    unknown = httpx.post(server.url + TXT2IMG, json={"prompt": "<lora:nope:1> <lora:gone>", "steps": 1}, timeout=60)
    error = assert_envelope(unknown, 400, "prompt")
    assert "'nope', 'gone'" in error["message"] and "ink" in error["message"]


def _start(server: LiveServer, **body: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """A txt2img request in a thread of its own; its answer lands in the returned dict."""
    result: dict[str, Any] = {}

    def post() -> None:
        result["answer"] = httpx.post(server.url + TXT2IMG, json={"width": SIZE, "height": SIZE, **body}, timeout=120)

    thread = threading.Thread(target=post)
    thread.start()
    return thread, result


def _progress_until(server: LiveServer, task: str, done: Any) -> dict[str, Any]:
    """Poll progress for ``task`` until ``done(answer)``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = httpx.get(server.url + PROGRESS, params={"id_task": task}, timeout=10).json()
        if done(answer):
            return answer
        time.sleep(0.01)
    raise AssertionError("progress did not get there")


def test_progress_moves_with_a_preview_and_interrupt_stops_the_request(server: LiveServer) -> None:
    cancelled = server.engine.stats["cancelled"]
    thread, result = _start(server, prompt="a fox", steps=1000, seed=1, force_task_id="watch-me",
                            override_settings={"show_progress_every_n_steps": 1})  # fmt: skip
    first = _progress_until(server, "watch-me", lambda a: a["state"]["sampling_step"] >= 1 and a["current_image"])
    later = _progress_until(server, "watch-me", lambda a: a["state"]["sampling_step"] > first["state"]["sampling_step"])
    assert 0 < first["progress"] < later["progress"] < 1 and later["state"]["sampling_steps"] == 1000
    assert later["state"]["job"] == "watch-me" and later["state"]["job_count"] >= 1
    assert open_png(base64.b64decode(first["current_image"])).size == (SIZE, SIZE)
    acted = httpx.post(server.url + "/sdapi/v1/interrupt", timeout=10)  # no id: the oldest running, this one
    assert acted.json() == {"job": "watch-me"}
    thread.join(timeout=60)
    answer = result["answer"]
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert answer.json()["images"] == [] and info["interrupted"] is True and info["all_seeds"] == []
    assert server.engine.stats["cancelled"] == cancelled + 1
    assert httpx.get(server.url + PROGRESS, timeout=10).json()["state"]["job"] == ""  # nothing in flight now


def test_skip_stops_the_running_image_and_the_waiting_one_goes_on(server: LiveServer) -> None:
    thread, result = _start(server, prompt="a fox", steps=300, seed=20, batch_size=2, force_task_id="skip-me")
    _progress_until(server, "skip-me", lambda a: a["state"]["sampling_step"] >= 1)
    assert httpx.post(server.url + "/sdapi/v1/skip", params={"id_task": "skip-me"}, timeout=10).json()["job"]
    thread.join(timeout=120)
    answer = result["answer"]
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert len(answer.json()["images"]) == 1 and info["all_seeds"] == [21] and "Seed: 21," in info["infotexts"][0]
