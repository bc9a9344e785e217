"""LoRA adapters through the HTTP APIs, on real servers (uvicorn on loopback), with the official ``openai`` client.

One server per engine for the module, each on its own fresh pipeline (adapters change a pipeline's modules), both
with two start-up adapters (``--lora``) and a directory of one more (``--lora-dir``). The contract: a request's
image is what diffusers gives after ``load_lora_weights`` + ``set_adapters(names, scales)`` with the request's seed
(threads engine: exactly; step engine: within its batching tolerance), alone and in a concurrent mix of sets.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import REPO, LiveServer, tiny_loader, wait_ready
from http_helpers import NATIVE, OPENAI, assert_envelope, fetch_png
from jobs_helpers import submit, wait_final
from lora_helpers import fresh_tiny, make_adapter, reference_images
from PIL import Image

SIZE, STEPS = 32, 3
MAX_ABS, MEAN_ABS = 2, 0.01  # the step engine's tolerance for a batched request (tests/test_step_engine.py)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    files = {"ink": make_adapter(root / "ink", seed=1), "neon": make_adapter(root / "neon", seed=2, scale=1.5)}
    directory = root / "dir"
    directory.mkdir()
    files["clay"] = directory / "clay.safetensors"
    files["clay"].write_bytes(make_adapter(root / "clay", seed=3).read_bytes())
    files["moss"] = directory / "moss.safetensors"  # clay's weights: a second name in the directory is enough
    files["moss"].write_bytes(files["clay"].read_bytes())
    return files


def _serve(adapters: dict[str, Path], tmp: Path, **options: Any) -> LiveServer:
    from serverasync import Settings, create_app

    settings = Settings(
        model="random:tiny",
        image_dir=str(tmp / "images"),
        data_dir=str(tmp),
        lora=[f"ink={adapters['ink'].parent}", f"neon={adapters['neon']}"],
        lora_dir=str(adapters["clay"].parent),
        max_loras=3,
        default_steps=STEPS,
        **options,
    )
    live = LiveServer(create_app(settings, loader=tiny_loader(fresh_tiny())))
    wait_ready(live.url)
    return live


@pytest.fixture(scope="module", params=["threads", "step"])
def server(request, adapters, tmp_path_factory) -> Iterator[LiveServer]:
    live = _serve(adapters, tmp_path_factory.mktemp(request.param), engine=request.param)
    yield live
    live.stop()


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _threads(server: LiveServer) -> int | None:
    engine = server.engine
    return max(1, engine.cpu_threads // engine.max_concurrency) if engine.cpu_threads else None


def _reference(
    adapters: dict[str, Path], loras: tuple[tuple[str, float], ...], seed: int, prompt: str, **call: Any
) -> np.ndarray:
    call = {"height": SIZE, "width": SIZE, **call}
    images = reference_images(adapters, loras, prompt=prompt, num_inference_steps=STEPS, seed=seed, **call)
    return np.asarray(images[0].convert("RGB"))


def _assert_matches(server: LiveServer, got: np.ndarray, want: np.ndarray, what: str) -> None:
    if server.engine.kind == "threads":
        np.testing.assert_array_equal(got, want, what)
        return
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (what, diff.max(), diff.mean())


def _native(server: LiveServer, prompt: str, seed: int, loras: list[dict[str, Any]] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"prompt": prompt, "seed": seed, "height": SIZE, "width": SIZE}
    if loras is not None:
        body["loras"] = loras
    return httpx.post(server.url + NATIVE, json=body, timeout=120)


def test_models_list_the_adapters_under_the_base_and_status_shows_the_pool(server: LiveServer) -> None:
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["random:tiny", "ink", "neon", "clay", "moss"]
    assert all(m["parent"] == "random:tiny" for m in models[1:]) and "parent" not in models[0]
    pool = httpx.get(server.url + "/api/status").json()["adapters"]
    assert pool["capacity"] == 3 and pool["available"] == ["ink", "neon", "clay", "moss"]
    assert set(pool["loaded"]) >= {"ink", "neon"}  # the start-up ones are loaded before the server is ready


def test_a_native_request_gets_diffusers_image_for_its_adapters(server: LiveServer, adapters) -> None:
    chosen = [{"name": "neon", "scale": 0.7}, {"name": "clay", "scale": 0.4}]  # clay: loaded on first use
    response = _native(server, "a lighthouse", 21, chosen)
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["loras"] == chosen
    got = _png_pixels(fetch_png(response.json()["response"][0]))
    _assert_matches(server, got, _reference(adapters, (("neon", 0.7), ("clay", 0.4)), 21, "a lighthouse"), "native")


def test_the_openai_client_names_adapters_by_model_and_extra_body(server: LiveServer, adapters) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(
        model="ink",
        prompt="a red fox",
        size=f"{SIZE}x{SIZE}",
        response_format="b64_json",
        extra_body={"seed": 8, "loras": [{"name": "neon", "scale": 0.5}]},
    )
    import base64

    got = _png_pixels(base64.b64decode(answer.data[0].b64_json))
    _assert_matches(server, got, _reference(adapters, (("ink", 1.0), ("neon", 0.5)), 8, "a red fox"), "openai")
    assert answer.model_extra["loras"] == [{"name": "ink", "scale": 1.0}, {"name": "neon", "scale": 0.5}]
    # A model name the server does not know is today's behaviour: the base model, no adapters.
    plain = client.images.generate(
        model="dall-e-3", prompt="a red fox", size=f"{SIZE}x{SIZE}", response_format="b64_json", extra_body={"seed": 8}
    )
    base = _png_pixels(base64.b64decode(plain.data[0].b64_json))
    _assert_matches(server, base, _reference(adapters, (), 8, "a red fox"), "dall-e-3 is the base model")


def test_a_concurrent_mix_of_adapter_sets_gets_each_its_own_image(server: LiveServer, adapters) -> None:
    """Twelve requests at once over four sets (one of them none): nothing leaks from one set into another."""
    sets = [[], [{"name": "ink", "scale": 1.0}], [{"name": "neon", "scale": 1.0}], [{"name": "clay", "scale": 0.8}]]
    jobs = [(f"a fox {i}", i, sets[i % 4]) for i in range(12)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: _native(server, *job), jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs), [r.text for r in responses if r.status_code != 200]
    for (prompt, seed, chosen), response in zip(jobs, responses, strict=True):
        got = _png_pixels(fetch_png(response.json()["response"][0]))
        loras = tuple((c["name"], c["scale"]) for c in chosen)
        _assert_matches(server, got, _reference(adapters, loras, seed, prompt), f"{loras} seed {seed}")


def test_an_edit_takes_adapters_from_the_openai_clients_multipart_extra_body(server: LiveServer, adapters) -> None:
    """images.edit sends extra_body's loras as loras[][name] / loras[][scale] form fields."""
    import base64

    from openai import OpenAI

    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    upload = io.BytesIO()
    image.save(upload, format="PNG")
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.images.edit(
        image=("in.png", upload.getvalue(), "image/png"),
        prompt="a boat",
        response_format="b64_json",
        extra_body={"seed": 6, "num_inference_steps": STEPS, "strength": 0.8, "loras": [{"name": "ink", "scale": 0.6}]},
    )
    assert answer.model_extra["loras"] == [{"name": "ink", "scale": 0.6}]
    got = _png_pixels(base64.b64decode(answer.data[0].b64_json))
    threads = _threads(server) if server.engine.kind == "threads" else None
    want = _reference(
        adapters,
        (("ink", 0.6),),
        6,
        "a boat",
        pipeline_class="StableDiffusion3Img2ImgPipeline",
        image=image,
        strength=0.8,
        threads=threads,
    )
    _assert_matches(server, got, want, "edit with an adapter")


def test_unknown_adapters_and_bad_scales_are_400_naming_them(server: LiveServer) -> None:
    error = assert_envelope(_native(server, "a fox", 1, [{"name": "nope"}]), 400, "loras[0].name")
    assert "unknown LoRA adapter 'nope'" in error["message"] and "ink, neon, clay, moss" in error["message"]
    assert error["code"] == "unknown_adapter"
    assert_envelope(_native(server, "a fox", 1, [{"name": "ink", "scale": 9}]), 400)
    assert_envelope(_native(server, "a fox", 1, [{"name": "ink"}, {"name": "ink"}]), 400, "loras")
    openai = httpx.post(
        server.url + OPENAI, json={"prompt": "a fox", "loras": [{"name": "../ink"}], "size": "32x32"}, timeout=60
    )
    assert_envelope(openai, 400, "loras[0].name")


def test_a_scale_is_a_json_number_not_a_string_or_a_boolean(server: LiveServer) -> None:
    """As strict as the rest of the body: "1" and true are refused on every JSON route; an integer is a number."""
    for scale in ("1", True, "0.5"):
        chosen = [{"name": "ink", "scale": scale}]
        assert_envelope(_native(server, "a fox", 1, chosen), 400, "loras.0.scale")
        job = httpx.post(server.url + "/api/jobs", json={"prompt": "a fox", "loras": chosen}, timeout=60)
        assert_envelope(job, 400, "loras.0.scale")
        body = {"prompt": "a fox", "size": f"{SIZE}x{SIZE}", "loras": chosen}
        assert_envelope(httpx.post(server.url + OPENAI, json=body, timeout=60), 400, "loras.0.scale")
    response = _native(server, "a fox", 1, [{"name": "ink", "scale": 1}])
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["loras"] == [{"name": "ink", "scale": 1.0}]


def test_more_directory_adapters_than_the_pool_can_ever_hold_is_400_naming_the_room(server: LiveServer) -> None:
    """--max-loras 3 less the two --lora ones leaves room for one directory adapter: a request naming two could
    never run (not 503 and retry for ever), on every route that takes adapters."""
    two = [{"name": "clay"}, {"name": "moss"}]
    png = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (90, 120, 150)).save(png, format="PNG")
    form = {"prompt": "a boat", "loras[][name]": "moss"}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answers = {
            "native": _native(server, "a fox", 1, two),
            "jobs": client.post("/api/jobs", json={"prompt": "a fox", "loras": two}),
            "openai model": client.post(OPENAI, json={"prompt": "a fox", "model": "clay", "loras": two[1:]}),
            "edits": client.post(
                "/v1/images/edits", data={**form, "model": "clay"}, files={"image": ("in.png", png.getvalue())}
            ),
        }
    for route, response in answers.items():
        error = assert_envelope(response, 400, "loras")
        assert error["code"] == "too_many_adapters", (route, error)
        assert "'clay', 'moss'" in error["message"] and "at most 1 of them" in error["message"], (route, error)
        assert "--max-loras 3, less the 2 named with --lora" in error["message"], (route, error)
        assert "retry-after" not in response.headers, route
    # One directory adapter with the two start-up ones fits: not refused.
    assert _native(server, "a fox", 1, [{"name": "ink"}, {"name": "neon"}, {"name": "moss"}]).status_code == 200


def test_jobs_take_adapters_and_metrics_count_them_by_name(server: LiveServer, adapters) -> None:
    body = {"prompt": "a kite", "seed": 4, "height": SIZE, "width": SIZE, "loras": [{"name": "ink", "scale": 0.9}]}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        state = wait_final(client, submit(client, body))
    assert state["status"] == "succeeded", state
    assert state["result"]["parameters"]["loras"] == [{"name": "ink", "scale": 0.9}]
    got = _png_pixels(fetch_png(state["result"]["response"][0]))
    _assert_matches(server, got, _reference(adapters, (("ink", 0.9),), 4, "a kite"), "job")
    metrics = httpx.get(server.url + "/metrics").text
    assert 'sd_lora_requests_total{adapter="ink"}' in metrics
    assert str(adapters["ink"].parent) not in metrics and "safetensors" not in metrics


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "serverasync.py"), "--model", "random:tiny", "--port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)


@pytest.mark.slow
def test_a_lora_file_that_cannot_be_read_ends_the_start_with_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 3)
    for args, words in [
        (["--lora", f"x={tmp_path / 'missing.safetensors'}"], "--lora x: "),
        (["--lora", f"x={broken}"], f"--lora x: {broken}: not a safetensors file"),
        (["--lora", "no-path"], "--lora: 'no-path': use NAME=PATH"),
        (["--lora-dir", str(tmp_path / "nowhere")], "no such directory"),
        (["--lora", f"x={broken}", "--compile", "--engine", "step"], "compile cannot serve LoRA adapters"),
    ]:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
