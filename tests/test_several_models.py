"""Several models in one server (issue 30), through real servers and real clients: each model's images are
diffusers' own for that model (``StableDiffusion3Pipeline.from_pretrained`` of its folder, the same seed) and a
server of that model alone's; requests for different models run at once; names route, or 404 when strict; the
models are listed with their adapters; a model evicted by the budget comes back with the same image.

The models are tests/model_dirs.py's family: ``large`` and ``medium`` share their text encoders' and VAE's files,
``other`` differs in everything.
"""

from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import LiveServer, wait_ready
from http_helpers import NATIVE, assert_envelope, fetch_png, open_png
from model_dirs import FAMILY, save_family

from api.loading import usable_cores

BODY = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "seed": 11, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_family(tmp_path_factory.mktemp("family"))


def _serve(tmp_path: Path, models: list[str], **options: Any) -> LiveServer:
    """A server of ``models`` loaded by the registry (its own loader: shared components loaded once)."""
    from serverasync import Settings, create_app

    data = tmp_path / f"data-{len(list(tmp_path.iterdir()))}"
    data.mkdir()
    settings = {"model": models, "data_dir": str(data), "image_dir": str(data / "images"), "max_concurrency": 1}
    if options.get("engine") == "step":
        settings.update(step_loops=1, max_concurrency=4)
    live = LiveServer(create_app(Settings(**{**settings, **options})))
    wait_ready(live.url)
    return live


@pytest.fixture(scope="module")
def several(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The three models; ``medium`` has a LoRA adapter, ``sparkle`` (made for random:tiny, the family's preset)."""
    from lora_helpers import make_adapter

    adapter = make_adapter(tmp_path_factory.mktemp("adapter"), seed=5)
    models = [f"{name}={family[name]}" for name in FAMILY]
    live = _serve(tmp_path_factory.mktemp("several"), models, lora=[f"medium:sparkle={adapter}"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def several_step(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The three models on the step engine (one loop: a request alone runs with every core, as diffusers' does)."""
    live = _serve(tmp_path_factory.mktemp("several-step"), [f"{name}={family[name]}" for name in FAMILY], engine="step")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def references(family: dict[str, Path]) -> dict[str, np.ndarray]:
    """diffusers' image of each model for BODY, with every usable core (a slot's share on these servers)."""
    return {name: _reference(family[name], usable_cores()) for name in FAMILY}


def _served(live: LiveServer, **body: Any) -> tuple[np.ndarray, dict[str, Any]]:
    with httpx.Client(base_url=live.url, timeout=120) as client:
        answer = client.post(NATIVE, json={**BODY, **body})
        assert answer.status_code == 200, answer.text
        payload = answer.json()
        return np.asarray(open_png(fetch_png(payload["response"][0], client))), payload


def _reference(folder: Path, threads: int) -> np.ndarray:
    """diffusers' image of ``folder`` for BODY, in a thread with ``threads`` OpenMP threads (as a slot has)."""
    from diffusers import StableDiffusion3Pipeline

    def run() -> np.ndarray:
        torch.set_num_threads(threads)
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        call = {k: v for k, v in BODY.items() if k != "seed"}
        generator = torch.Generator("cpu").manual_seed(BODY["seed"])
        return np.asarray(pipe(generator=generator, output_type="pil", **call).images[0])

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


@pytest.mark.parametrize("engine", ["threads", "step"])
def test_each_model_gives_its_own_diffusers_image(
    engine: str, references: dict[str, np.ndarray], request: pytest.FixtureRequest
) -> None:
    live = request.getfixturevalue("several" if engine == "threads" else "several_step")
    for name in FAMILY:
        image, payload = _served(live, model=name)
        assert payload["parameters"]["model"] == name, "the answer does not say which model served"
        assert np.array_equal(image, references[name]), name
    assert not np.array_equal(references["large"], references["medium"]), "two models gave one image"


def test_a_model_gives_what_a_server_of_it_alone_gives(
    several: LiveServer, family: dict[str, Path], tmp_path: Path
) -> None:
    alone = _serve(tmp_path, [str(family["medium"])])
    try:
        want, payload = _served(alone)
        assert "model" not in payload["parameters"], "a server of one model answers as it always did"
    finally:
        alone.stop()
    got, _ = _served(several, model="medium")
    assert np.array_equal(got, want)


def test_shared_components_are_loaded_once(several: LiveServer) -> None:
    for name in FAMILY:
        _served(several, model=name)
    status = httpx.get(f"{several.url}/api/status").json()["models"]
    shared = {tuple(c["models"]) for c in status["shared_components"]}
    assert shared and shared <= {("large", "medium")}, status["shared_components"]
    assert status["models"]["other"]["bytes_shared"] == 0
    assert status["models"]["medium"]["bytes_shared"] > status["models"]["medium"]["bytes_alone"]
    assert several.app.state.modelset is not None


@pytest.mark.parametrize("engine", ["threads", "step"])
def test_concurrent_requests_for_different_models_all_succeed(engine: str, request: pytest.FixtureRequest) -> None:
    """Six requests at once, two per model: all answered by their model (on the step engine, each model's own
    denoising loop ran their passes: /metrics has each one's pass sizes)."""
    live = request.getfixturevalue("several" if engine == "threads" else "several_step")

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            bodies = [{**BODY, "model": name, "seed": seed} for seed in (1, 2) for name in FAMILY]
            return await asyncio.gather(*(client.post(NATIVE, json=body) for body in bodies))

    answers = asyncio.run(main())
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers if a.status_code != 200]
    assert [a.json()["parameters"]["model"] for a in answers] == list(FAMILY) * 2
    if engine == "step":
        from test_metrics import scrape, value

        metrics, _ = scrape(live.url)
        assert all(value(metrics, "sd_batch_size_count", model=name) >= 2 for name in FAMILY), "passes per model"


def test_routing_by_name_listing_and_the_openai_client(several: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{several.url}/v1", api_key="unused")
    listed = client.models.list().data
    assert [m.id for m in listed] == ["large", "medium", "sparkle", "other"]
    assert listed[2].model_extra["parent"] == "medium", "an adapter is listed under its model"
    answer = client.images.generate(model="other", prompt="a fox", size="64x64", extra_body={"num_inference_steps": 1})
    assert answer.model_extra["model"] == "other"
    unknown = client.images.generate(model="dall-e-3", prompt="a fox", size="64x64", extra_body={"seed": 3})
    assert unknown.model_extra["model"] == "large", "an unknown name did not go to the default model"


def test_strict_names_answer_404_model_not_found(family: dict[str, Path], tmp_path: Path) -> None:
    live = _serve(tmp_path, [f"a={family['large']}", f"b={family['medium']}"], strict_model_names=True)
    try:
        answer = httpx.post(f"{live.url}{NATIVE}", json={**BODY, "model": "nope"}, timeout=60)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
        assert httpx.post(f"{live.url}{NATIVE}", json={**BODY, "model": "b"}, timeout=60).status_code == 200
    finally:
        live.stop()


@pytest.fixture(scope="module")
def budget_of_two(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> int:
    """A budget that fits any two of the three models, never the three (their measured weights, from a server that
    loaded them all)."""
    probe = _serve(tmp_path_factory.mktemp("probe"), [f"{name}={family[name]}" for name in FAMILY])
    try:
        for name in FAMILY:
            _served(probe, model=name)
        sizes = httpx.get(f"{probe.url}/api/status").json()["models"]["models"]
    finally:
        probe.stop()
    total = {name: sizes[name]["bytes_alone"] + sizes[name]["bytes_shared"] for name in FAMILY}
    # Any two fit, never the three: large and medium together hold the shared parts once. Half of medium's own
    # bytes short of the three: far beyond where a load's estimate and its measurement differ (a few KB).
    return total["large"] + total["other"] + sizes["medium"]["bytes_alone"] // 2


def _states(live: LiveServer) -> dict[str, str]:
    return {n: m["state"] for n, m in httpx.get(f"{live.url}/api/status").json()["models"]["models"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["threads", "step"])
def test_a_budget_of_two_evicts_the_least_recently_used_and_brings_it_back(
    family: dict[str, Path], tmp_path: Path, engine: str, budget_of_two: int
) -> None:
    """A budget that fits two of the three: asking for the third evicts the least recently used idle one; asking
    for that one again loads it back, with the same image as before."""
    models = [f"{name}={family[name]}" for name in FAMILY]
    # Admission by measured memory off: the budget is the weights' alone here, whatever the requests would take.
    live = _serve(tmp_path, models, engine=engine, memory_budget=str(budget_of_two), memory_admission="off")
    try:
        first, _ = _served(live, model="large")
        _served(live, model="other")
        _served(live, model="medium")  # evicts large, the least recently used
        states = _states(live)
        assert states["large"] != "resident" and states["medium"] == "resident", states
        again, _ = _served(live, model="large")
        assert np.array_equal(first, again), "the model brought back gave another image"
    finally:
        live.stop()


class Gate:
    """Holds every denoising step of one resident model's transformer at a gate (a forward pre-hook on the loaded
    module, added once the server runs: no start-up pass is held)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        import threading

        self.open = threading.Event()
        self.entered = threading.Event()
        self.handle = transformer.register_forward_pre_hook(self._wait)

    def _wait(self, *_: Any) -> None:
        self.entered.set()
        self.open.wait(60)  # bounded: a failing test never hangs the server

    def release(self) -> None:
        self.open.set()
        self.handle.remove()


def test_a_model_with_a_request_in_flight_is_never_evicted(
    family: dict[str, Path], tmp_path: Path, budget_of_two: int
) -> None:
    """large, the least recently used, is held by a running request when medium needs room: other (idle) goes."""
    from test_metrics import scrape, value

    models = [f"{name}={family[name]}" for name in FAMILY]
    live = _serve(tmp_path, models, memory_budget=str(budget_of_two), memory_admission="off", max_concurrency=2)
    gate = None
    try:
        _served(live, model="other")  # large (the default) and other resident
        gate = Gate(live.app.state.bundles["large"].view.loaded.pipeline.transformer)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(_served, live, model="large")
            assert gate.entered.wait(60), "the request for large never started"
            _served(live, model="other")  # other is now used after large: large is the least recently used
            metrics, _ = scrape(live.url)
            assert value(metrics, "sd_requests_running", model="large") == 1
            assert value(metrics, "sd_model_requests_in_flight", model="large") == 1
            _served(live, model="medium")  # needs room: other goes, never large
            states = _states(live)
            assert states["large"] == "resident" and states["medium"] == "resident", states
            assert states["other"] != "resident", states
            gate.release()
            image, payload = held.result(timeout=120)
        assert payload["parameters"]["model"] == "large"
        assert np.array_equal(image, _served(live, model="large")[0]), "the held request's image is not large's"
    finally:
        if gate is not None:
            gate.release()
        live.stop()


def test_an_adapter_of_one_model_asked_on_another_is_refused_naming_both(several: LiveServer) -> None:
    loras = [{"name": "sparkle", "scale": 1.0}]
    refused = httpx.post(f"{several.url}{NATIVE}", json={**BODY, "model": "large", "loras": loras}, timeout=60)
    error = assert_envelope(refused, 400, "loras[0].name")
    assert error["code"] == "adapter_of_another_model", error
    assert "'medium'" in error["message"] and "'large'" in error["message"], "the 400 does not name both models"
    plain, _ = _served(several, model="medium")
    with_adapter, payload = _served(several, model="medium", loras=loras)
    assert payload["parameters"]["model"] == "medium" and not np.array_equal(plain, with_adapter)


def _a1111(live: LiveServer, **body: Any) -> tuple[np.ndarray, dict[str, Any]]:
    call = {"prompt": BODY["prompt"], "steps": BODY["num_inference_steps"], "seed": BODY["seed"], "width": 64}
    answer = httpx.post(f"{live.url}/sdapi/v1/txt2img", json={**call, "height": 64, **body}, timeout=120)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    image = np.asarray(open_png(base64.b64decode(payload["images"][0])))
    return image, json.loads(payload["info"])


def test_a1111_checkpoints_list_every_model_and_select_the_one_that_runs(several: LiveServer) -> None:
    """``sd_model_checkpoint`` picks the model: per request in ``override_settings``, for the A1111 API through
    ``POST /sdapi/v1/options`` (as A1111 switches its checkpoint); the other APIs keep the server's default."""
    url = f"{several.url}/sdapi/v1"
    assert [m["title"] for m in httpx.get(f"{url}/sd-models").json()] == list(FAMILY)
    assert httpx.get(f"{url}/options").json()["sd_model_checkpoint"] == "large"
    medium, _ = _served(several, model="medium")
    large, _ = _served(several)
    image, info = _a1111(several, override_settings={"sd_model_checkpoint": "medium"})
    assert np.array_equal(image, medium) and info["sd_model_name"] == "medium"
    assert np.array_equal(_a1111(several)[0], large), "an override changed the API's checkpoint"
    assert httpx.get(f"{url}/loras").json() == []  # large's adapters: none
    tagged = {"prompt": BODY["prompt"] + " <lora:sparkle:0.5>"}
    refused = httpx.post(f"{url}/txt2img", json={**tagged, "steps": 1, "width": 64, "height": 64}, timeout=60)
    assert refused.status_code == 400 and "belongs to model 'medium'" in refused.json()["error"]["message"]
    try:
        options = httpx.get(f"{url}/options").json()
        answer = httpx.post(f"{url}/options", json={**options, "sd_model_checkpoint": "medium"})
        assert answer.status_code == 200 and answer.json()["sd_model_checkpoint"] == "medium"
        assert httpx.get(f"{url}/options").json()["sd_model_checkpoint"] == "medium"
        image, info = _a1111(several)
        assert np.array_equal(image, medium) and info["sd_model_name"] == "medium"
        assert [lora["name"] for lora in httpx.get(f"{url}/loras").json()] == ["sparkle"]
        assert _a1111(several, **tagged)[1]["sd_model_name"] == "medium"
        assert _served(several)[1]["parameters"]["model"] == "large", "the native API's default changed"
        unknown = httpx.post(f"{url}/options", json={"sd_model_checkpoint": "nope"})
        assert unknown.status_code == 400 and "'other'" in unknown.json()["error"]["message"]
    finally:
        httpx.post(f"{url}/options", json={"sd_model_checkpoint": "large"})


def test_metrics_per_model_with_configured_names_only(several: LiveServer) -> None:
    from test_metrics import scrape, value

    before, _ = scrape(several.url)
    _served(several, model="medium")
    _served(several, model="nobody-knows")  # goes to the default: counted as large's
    after, _ = scrape(several.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("sd_requests_total", api="native", status="200", model="medium") == 1
    assert moved("sd_requests_total", api="native", status="200", model="large") == 1
    assert moved("sd_images_total", model="medium") == 1 and moved("sd_images_total", model="other") == 0
    assert moved("sd_generation_seconds_count", model="large") == 1
    # The first scrape and the two images fetched: requests of no model.
    assert moved("sd_requests_total", api="other", status="200", model="") == 3
    for name in FAMILY:
        assert value(after, "sd_requests_running", model=name) == 0
        assert ("sd_model_loads_total", (("model", name),)) in after  # every model, loaded or not
        assert (
            sum(value(after, "sd_model_state", model=name, state=s) for s in ("unloaded", "loading", "resident", "cpu"))
            == 1
        )
    assert value(after, "sd_model_state", model="medium", state="resident") == 1
    assert value(after, "sd_model_loads_total", model="medium") >= 1
    assert value(after, "sd_model_bytes", model="medium", held="shared") > 0
    assert value(after, "sd_model_bytes", model="other", held="shared") == 0
    assert value(after, "sd_models_memory_used_bytes") > 0
    lookups = moved("sd_prompt_cache_hits_total", model="medium") + moved(
        "sd_prompt_cache_misses_total", model="medium"
    )
    assert lookups >= 1, "medium's prompt cache was not counted"
    labelled = {dict(labels).get("model") for (_, labels) in after if "model" in dict(labels)}
    assert labelled <= {*FAMILY, ""}, labelled
