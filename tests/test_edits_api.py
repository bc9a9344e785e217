"""Edits over HTTP: the official ``openai`` client's images.edit (with and without a mask) and create_variation,
OpenAI's JSON image_url form,
the native ``image`` / ``mask_image`` / ``strength`` fields (sync and jobs), /api/status and the OpenAPI document,
and the pixels: an edit through the API is diffusers' own image-to-image (and inpainting) for the same inputs and
seed, on the threads engine exactly and on the step engine within its tolerance."""

from __future__ import annotations

import base64
import copy
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from edits_helpers import EDITS, VARIATIONS, data_url, encoded, noise, openai_mask, white_repaints
from http_helpers import NATIVE, assert_envelope, fetch_png, open_png
from PIL import Image

from api import Settings, create_app

FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One threads-engine server for the module (the largest side 64, so that fitting to the limits shows)."""
    from conftest import LiveServer, tiny_loader, wait_ready

    images, data = (str(tmp_path_factory.mktemp(name)) for name in ("edit-images", "edit-data"))
    settings = Settings(model="random:tiny", image_dir=images, data_dir=data, max_image_size=64)
    live = LiveServer(create_app(settings, loader=tiny_loader(tiny_pipeline)))
    wait_ready(live.url)
    yield live
    live.stop()


def client_for(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def decoded(b64: str | None) -> Image.Image:
    return open_png(base64.b64decode(b64 or "", validate=True))


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


PHOTO = noise(48, 32, seed=5)


def test_images_edit_with_a_file_a_list_of_one_and_a_list_of_two(server: Any, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(encoded(PHOTO))
    client = client_for(server)
    options = {"prompt": "a fox", "response_format": "b64_json", "extra_body": {**FAST, "seed": 3}}
    with path.open("rb") as file:
        single = client.images.edit(image=file, model="gpt-image-1", quality="high", user="u1", **options)
    assert single.size == "48x32" and len(single.data) == 1  # size auto: the input's own
    with path.open("rb") as file:
        listed = client.images.edit(image=[file], n=2, **options)
    images = [decoded(item.b64_json) for item in listed.data]
    assert [im.size for im in images] == [(48, 32)] * 2
    assert images[0].tobytes() != images[1].tobytes()
    # Same seed, same first image: its own noise, so the same picture; the pixels to a rounding, since a batch of
    # two runs other kernels than a batch of one and some CPUs round them apart (one level, measured).
    first, alone = (np.asarray(im, dtype=np.int16) for im in (images[0], decoded(single.data[0].b64_json)))
    assert np.abs(first - alone).max() <= 2 and np.abs(first - alone).mean() < 0.05
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=[path.read_bytes(), path.read_bytes()], **options)
    assert caught.value.code == "too_many_images" and "one image per request" in str(caught.value)


def test_edit_sizes_explicit_auto_and_fitted_to_the_limits(server: Any) -> None:
    client = client_for(server)
    explicit = client.images.edit(image=encoded(PHOTO), prompt="a fox", size="32x32", extra_body=FAST)  # type: ignore[arg-type]
    assert explicit.size == "32x32" and open_png(fetch_png(explicit.data[0].url or "")).size == (32, 32)
    # 100x50 is past the largest side (64): scaled to fit, 64x32; 40x24 rounds to the nearest multiples of 16.
    for size, expected in (((100, 50), "64x32"), ((40, 24), "48x32")):
        answer = client.images.edit(image=encoded(noise(*size)), prompt="a fox", size="auto", extra_body=FAST)
        assert answer.size == expected


def test_edit_streams_image_edit_events(server: Any) -> None:
    events = list(
        client_for(server).images.edit(
            image=encoded(PHOTO), prompt="a fox", stream=True, partial_images=2, extra_body={"num_inference_steps": 8}
        )
    )
    kinds = [event.type for event in events]
    # 8 steps at strength 0.6 run 5; two partials before the last of them, then the image.
    assert kinds == ["image_edit.partial_image"] * 2 + ["image_edit.completed"], kinds
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert decoded(events[-1].b64_json).size == (48, 32) and events[-1].size == "48x32"


def test_create_variation_is_image_to_image_from_the_image_alone(server: Any) -> None:
    client = client_for(server)
    options = {"n": 2, "response_format": "b64_json", "extra_body": {**FAST, "seed": 9}}
    with pytest.warns(DeprecationWarning):  # the client marks the endpoint deprecated; ours serves it
        answer = client.images.create_variation(image=encoded(PHOTO), model="dall-e-2", **options)
    images = [decoded(item.b64_json) for item in answer.data]
    assert [im.size for im in images] == [(48, 32)] * 2 and images[0].tobytes() != images[1].tobytes()
    # An empty prompt is what a variation means; where a prompt is the point, a blank one stays refused.
    native = {"prompt": " ", "image": data_url(encoded(PHOTO)), **FAST}
    assert httpx.post(server.url + NATIVE, json=native, timeout=60).status_code == 400


def test_json_image_url_form_takes_data_urls(server: Any) -> None:
    body = {"prompt": "a fox", "images": [{"image_url": data_url(encoded(PHOTO))}], "seed": 4, **FAST}
    answer = httpx.post(server.url + EDITS, json={**body, "response_format": "b64_json"}, timeout=60)
    assert answer.status_code == 200, answer.text
    multipart = client_for(server).images.edit(
        image=encoded(PHOTO), prompt="a fox", response_format="b64_json", extra_body={**FAST, "seed": 4}
    )
    assert decoded(answer.json()["data"][0]["b64_json"]).tobytes() == decoded(multipart.data[0].b64_json).tobytes()
    # The same through the openai client's generic post (it has no image_url parameter for edits).
    raw = client_for(server).post("/images/edits", body=body, cast_to=httpx.Response)
    assert raw.status_code == 200 and raw.json()["data"][0]["url"].startswith(server.url + "/images/")


def test_native_edits_report_task_and_strength_and_resize(server: Any) -> None:
    image = data_url(encoded(PHOTO))
    answer = httpx.post(server.url + NATIVE, json={"prompt": "a fox", "image": image, **FAST}, timeout=60).json()
    params = answer["parameters"]
    assert (params["task"], params["strength"], params["width"], params["height"]) == ("image-to-image", 0.6, 48, 32)
    assert open_png(fetch_png(answer["response"][0])).size == (48, 32)
    sized = {"prompt": "a fox", "image": image, "width": 64, "strength": 0.3, **FAST}
    params = httpx.post(server.url + NATIVE, json=sized, timeout=60).json()["parameters"]
    assert (params["width"], params["height"], params["strength"]) == (64, 48, 0.3)  # the other side follows
    text = httpx.post(server.url + NATIVE, json={"prompt": "a fox", **FAST}, timeout=60).json()["parameters"]
    assert (text["task"], text["strength"]) == ("text-to-image", None)


def test_a_job_with_an_image_counts_the_steps_it_runs(server: Any) -> None:
    body = {"prompt": "a fox", "image": data_url(encoded(PHOTO)), "num_inference_steps": 10, "strength": 0.5}
    created = httpx.post(server.url + "/api/jobs", json=body, timeout=60)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 120
    while (job := httpx.get(created.json()["status_url"], timeout=30).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    assert job["total_steps"] == 5 == job["step"]  # 10 steps at strength 0.5
    assert job["result"]["parameters"]["task"] == "image-to-image"


def test_status_lists_the_tasks_and_openapi_shows_the_routes(server: Any) -> None:
    tasks = httpx.get(server.url + "/api/status", timeout=30).json()["tasks"]
    assert {"text-to-image", "image-to-image"} <= set(tasks["available"])
    document = httpx.get(server.url + "/openapi.json", timeout=30).json()
    edit = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert edit["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert "images" in edit["application/json"]["schema"]["properties"]
    variation = document["paths"]["/v1/images/variations"]["post"]["requestBody"]["content"]
    assert "strength" in variation["multipart/form-data"]["schema"]["properties"]
    native = document["components"]["schemas"]["InferenceRequest"]["properties"]
    assert {"image", "mask_image", "strength"} <= set(native)


# -- the pixels: diffusers' own pipelines for the same inputs -------------------------------------------------


def _reference(live: Any, pipeline: Any, class_name: str, **call: Any) -> list[Image.Image]:
    """diffusers' ``class_name`` over the same weights, called as the server's threads engine calls its pipeline:
    in a thread with that engine's share of the cores (OpenMP's thread count changes the float sums' order)."""
    import diffusers

    cls = getattr(diffusers, class_name)
    # Its own scheduler: a call sets its scheduler's timesteps, and the session's pipeline must not be written to.
    reference = cls(**{**pipeline.components, "scheduler": copy.deepcopy(pipeline.scheduler)})
    reference.set_progress_bar_config(disable=True)
    engine = live.engine
    threads = max(1, engine.cpu_threads // engine.max_concurrency) if engine.cpu_threads else torch.get_num_threads()

    def run() -> list[Image.Image]:
        torch.set_num_threads(threads)
        return reference(generator=torch.Generator("cpu").manual_seed(call.pop("seed")), **call).images

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


@pytest.fixture(scope="module", params=["threads", "step"])
def engines(request: Any, tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from conftest import LiveServer, tiny_loader, wait_ready

    images, data = (str(tmp_path_factory.mktemp(f"eq-{request.param}-{name}")) for name in ("images", "data"))
    settings = Settings(model="random:tiny", image_dir=images, data_dir=data, engine=request.param)
    live = LiveServer(create_app(settings, loader=tiny_loader(tiny_pipeline)))
    wait_ready(live.url)
    live.kind = request.param
    yield live
    live.stop()


def _assert_same(got: list[Image.Image], expected: list[Image.Image], kind: str) -> None:
    diff = np.abs(np.stack([as_array(im) for im in got]) - np.stack([as_array(im) for im in expected]))
    if kind == "threads":
        assert diff.max() == 0, (diff.max(), diff.mean())
    else:  # the step engine's tolerance (tests/test_step_engine.py)
        assert diff.max() <= 2 and diff.mean() <= 0.01, (diff.max(), diff.mean())


def test_an_edit_is_diffusers_image_to_image(engines: Any, tiny_pipeline: Any) -> None:
    image = noise(48, 32, seed=8)
    answer = client_for(engines).images.edit(
        image=encoded(image),
        prompt="a red fox",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 21, "num_inference_steps": 6, "strength": 0.7},
    )
    got = [decoded(item.b64_json) for item in answer.data]
    expected = _reference(
        engines,
        tiny_pipeline,
        "StableDiffusion3Img2ImgPipeline",
        prompt="a red fox",
        image=image,
        strength=0.7,
        height=32,
        width=48,
        num_images_per_prompt=2,
        num_inference_steps=6,
        seed=21,
    )
    _assert_same(got, expected, engines.kind)
    # And not text-to-image in disguise.
    text = httpx.post(
        engines.url + NATIVE,
        json={"prompt": "a red fox", "seed": 21, "width": 48, "height": 32, "num_inference_steps": 6},
        timeout=60,
    ).json()
    assert as_array(open_png(fetch_png(text["response"][0]))).tobytes() != as_array(got[0]).tobytes()


def test_the_native_edit_is_diffusers_image_to_image(engines: Any, tiny_pipeline: Any) -> None:
    image = noise(32, 32, seed=2)
    body = {"prompt": "a boat", "image": data_url(encoded(image)), "seed": 5, "num_inference_steps": 4}
    answer = httpx.post(engines.url + NATIVE, json=body, timeout=60).json()
    got = [open_png(fetch_png(url)) for url in answer["response"]]
    expected = _reference(
        engines,
        tiny_pipeline,
        "StableDiffusion3Img2ImgPipeline",
        prompt="a boat",
        image=image,
        height=32,
        width=32,
        num_inference_steps=4,
        seed=5,
    )  # diffusers' default strength, 0.6, as the answer reports
    assert answer["parameters"]["strength"] == 0.6
    _assert_same(got, expected, engines.kind)


def test_a_variation_is_diffusers_image_to_image_with_an_empty_prompt(engines: Any, tiny_pipeline: Any) -> None:
    image = noise(32, 48, seed=4)
    with pytest.warns(DeprecationWarning):
        answer = client_for(engines).images.create_variation(
            image=io.BytesIO(encoded(image)), response_format="b64_json", extra_body={"seed": 6, **FAST}
        )
    expected = _reference(
        engines,
        tiny_pipeline,
        "StableDiffusion3Img2ImgPipeline",
        prompt="",
        image=image,
        height=48,
        width=32,
        num_inference_steps=2,
        seed=6,
    )
    _assert_same([decoded(answer.data[0].b64_json)], expected, engines.kind)


BOX = (8, 8, 24, 32)  # the part to repaint, on the latent grid (8 px); the rest is kept


def _kept(decoded: list[Image.Image], image: Image.Image, box: tuple[int, int, int, int]) -> list[Image.Image]:
    """An inpainting edit's answer (no feather): ``decoded`` (the pipeline's images) inside ``box``, ``image``'s
    own pixels everywhere else."""
    answers = []
    for each in decoded:
        answer = image.convert("RGB").copy()
        answer.paste(each.convert("RGB").crop(box), box[:2])
        answers.append(answer)
    return answers


def _outside(box: tuple[int, int, int, int], size: tuple[int, int], margin: int = 0) -> np.ndarray:
    """The pixels (rows x columns) farther than ``margin`` from ``box``, whose right and bottom edges are open."""
    rows, cols = np.mgrid[0 : size[1], 0 : size[0]]
    left, top, right, bottom = box
    return (cols < left - margin) | (cols >= right + margin) | (rows < top - margin) | (rows >= bottom + margin)


def test_an_edit_with_a_mask_is_diffusers_inpainting(engines: Any, tiny_pipeline: Any) -> None:
    """OpenAI's mask (transparent = edit) through the client, diffusers' (white = repaint) through the native API
    and the JSON form: the same inpainting, and diffusers' own StableDiffusion3InpaintPipeline's pixels."""
    image = noise(48, 32, seed=12)
    seed_steps = {"seed": 17, "num_inference_steps": 5}
    answer = client_for(engines).images.edit(
        image=encoded(image),
        mask=encoded(openai_mask(image.size, BOX)),
        prompt="a red boat",
        response_format="b64_json",
        extra_body=seed_steps,
    )
    got = [decoded(item.b64_json) for item in answer.data]
    expected = _reference(
        engines,
        tiny_pipeline,
        "StableDiffusion3InpaintPipeline",
        prompt="a red boat",
        image=image,
        mask_image=white_repaints(image.size, BOX),
        strength=1.0,  # inpainting's default, as the engine always passes it
        height=32,
        width=48,
        num_inference_steps=5,
        seed=17,
    )
    expected = _kept(expected, image, BOX)  # the pipeline's inside the mask, the input's own pixels outside
    _assert_same(got, expected, engines.kind)
    native = {"prompt": "a red boat", "image": data_url(encoded(image)), **seed_steps}
    native["mask_image"] = data_url(encoded(white_repaints(image.size, BOX)))
    answer = httpx.post(engines.url + NATIVE, json=native, timeout=60).json()
    assert (answer["parameters"]["task"], answer["parameters"]["strength"]) == ("inpainting", 1.0)
    _assert_same([open_png(fetch_png(answer["response"][0]))], expected, engines.kind)
    by_reference = {
        "prompt": "a red boat",
        "images": [{"image_url": data_url(encoded(image))}],
        "mask": {"image_url": data_url(encoded(openai_mask(image.size, BOX)))},
        "response_format": "b64_json",
        **seed_steps,
    }
    answer = httpx.post(engines.url + EDITS, json=by_reference, timeout=60).json()
    _assert_same([decoded(answer["data"][0]["b64_json"])], expected, engines.kind)


def test_a_model_that_cannot_inpaint_says_why(make_server: Any, tiny_pipeline: Any) -> None:
    """A 4-channel latent space: /api/status names the reason, and an edit with a mask is refused 400 with it."""
    from conftest import tiny_loader
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng():
        torch.manual_seed(7)
        transformer = SD3Transformer2DModel.from_config(
            {**tiny_pipeline.transformer.config, "in_channels": 4, "out_channels": 4}
        )
        vae = AutoencoderKL.from_config({**tiny_pipeline.vae.config, "latent_channels": 4})
    model = StableDiffusion3Pipeline(**{**tiny_pipeline.components, "transformer": transformer, "vae": vae})
    live = make_server(loader=tiny_loader(model))
    tasks = httpx.get(live.url + "/api/status", timeout=30).json()["tasks"]
    reason = tasks["unavailable"]["inpainting"]
    assert "inpainting needs a transformer of 16 input channels" in reason and "inpainting" not in tasks["available"]
    image = encoded(noise(32, 32))
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live).images.edit(image=image, mask=encoded(openai_mask((32, 32), BOX)), prompt="a boat")
    assert caught.value.code == "task_unavailable" and reason in caught.value.message
    native = {"prompt": "a boat", "image": data_url(image), "mask_image": data_url(image)}
    refused = httpx.post(live.url + NATIVE, json=native, timeout=60)
    assert refused.status_code == 400 and reason in refused.json()["error"]["message"]
    assert live.engine.stats["total"] == 0


def _job_images(url: str, body: dict[str, Any]) -> list[Image.Image]:
    created = httpx.post(url + "/api/jobs", json=body, timeout=60)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 120
    while (job := httpx.get(created.json()["status_url"], timeout=30).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    return [open_png(fetch_png(each)) for each in job["result"]["response"]]


def test_an_inpainting_edit_keeps_the_unmasked_pixels_exactly_on_every_route(engines: Any) -> None:
    """Outside the mask every answer is the input's own pixels, exactly (the VAE's decode changes them all: the
    engine puts them back), whichever route asked: the native API, a job, OpenAI's edits answered at once or
    streamed (the final image); with an output smaller than the input, the input resized to it (Lanczos)."""
    image, steps = noise(32, 32, seed=14), {"seed": 3, "num_inference_steps": 2}
    native = {"prompt": "a boat", "image": data_url(encoded(image)), **steps}
    native["mask_image"] = data_url(encoded(white_repaints(image.size, BOX)))
    answer = httpx.post(engines.url + NATIVE, json=native, timeout=60).json()
    got = {"native": open_png(fetch_png(answer["response"][0])), "job": _job_images(engines.url, native)[0]}
    mask = encoded(openai_mask(image.size, BOX))
    client = client_for(engines)
    edit = client.images.edit(
        image=encoded(image), mask=mask, prompt="a boat", response_format="b64_json", extra_body=steps
    )
    got["openai"] = decoded(edit.data[0].b64_json)
    stream = list(client.images.edit(image=encoded(image), mask=mask, prompt="a boat", stream=True, extra_body=steps))
    got["stream"] = decoded(stream[-1].b64_json)
    kept = _outside(BOX, image.size)
    for route, each in got.items():
        assert np.array_equal(as_array(each)[kept], as_array(image)[kept]), route
        assert not np.array_equal(as_array(each)[~kept], as_array(image)[~kept]), route  # and it did repaint
    big = noise(64, 64, seed=15)  # answered at 32x32: "the input" is then the input resized to it
    resized = {**native, "image": data_url(encoded(big)), "width": 32, "height": 32}
    resized["mask_image"] = data_url(encoded(white_repaints(big.size, (16, 16, 48, 64))))
    answer = httpx.post(engines.url + NATIVE, json=resized, timeout=60).json()
    small = big.resize((32, 32), Image.Resampling.LANCZOS)
    got_small = as_array(open_png(fetch_png(answer["response"][0])))
    assert np.array_equal(got_small[kept], as_array(small)[kept])


def test_mask_blur_feathers_the_seam_on_both_apis(engines: Any) -> None:
    """mask_blur (pixels, both APIs; the answer reports it): beyond 3 x mask_blur pixels of the mask's edge the
    input's pixels, exactly; nearer, a blend, unlike the hard edge of mask_blur 0 (the default)."""
    image, steps = noise(48, 32, seed=16), {"seed": 8, "num_inference_steps": 2}
    native = {"prompt": "a boat", "image": data_url(encoded(image)), **steps}
    native["mask_image"] = data_url(encoded(white_repaints(image.size, BOX)))
    hard = httpx.post(engines.url + NATIVE, json=native, timeout=60).json()
    soft = httpx.post(engines.url + NATIVE, json={**native, "mask_blur": 2}, timeout=60).json()
    assert (hard["parameters"]["mask_blur"], soft["parameters"]["mask_blur"]) == (0, 2)
    hard_image, soft_image = (as_array(open_png(fetch_png(a["response"][0]))) for a in (hard, soft))
    far = _outside(BOX, image.size, margin=6)
    assert np.array_equal(soft_image[far], as_array(image)[far])
    band = _outside(BOX, image.size) & ~far
    assert not np.array_equal(soft_image[band], as_array(image)[band])  # the seam is feathered outwards
    assert not np.array_equal(soft_image, hard_image)
    edit = client_for(engines).images.edit(
        image=encoded(image),
        mask=encoded(openai_mask(image.size, BOX)),
        prompt="a boat",
        response_format="b64_json",
        extra_body={**steps, "mask_blur": 2},
    )
    _assert_same([decoded(edit.data[0].b64_json)], [Image.fromarray(soft_image.astype(np.uint8))], "threads")


@pytest.mark.parametrize(
    ("parts", "code", "words"),
    [
        ({"files": [("image[]", (f"{i}.png", b"x", "image/png")) for i in range(9)]}, "too_many_files", "8 files"),
        ({"data": {f"field{i}": "1" for i in range(201)}}, "too_many_fields", "200 text fields"),
        ({"data": {"prompt": "x" * (1024 * 1024 + 1)}}, "part_too_large", "1024 KiB"),
    ],
    ids=["files", "fields", "part-size"],
)
def test_multipart_limits_answer_the_envelope_with_our_codes(
    server: Any, parts: dict[str, Any], code: str, words: str
) -> None:
    """Starlette's multipart parser refuses a form past its limits with its own words and no code: answered here in
    the envelope, with a code of ours and the limit, on edits and variations alike."""
    before = server.engine.stats["total"]
    for path in (EDITS, VARIATIONS):
        files = parts.get("files") or [("image", ("a.png", encoded(noise(16, 16)), "image/png"))]
        answer = httpx.post(server.url + path, files=files, data=parts.get("data", {"prompt": "a fox"}), timeout=60)
        error = assert_envelope(answer, 400)
        assert (error["type"], error["code"]) == ("invalid_request_error", code) and words in error["message"], error
    assert server.engine.stats["total"] == before


def test_a_body_that_is_not_multipart_is_invalid_multipart(server: Any) -> None:
    headers = {"Content-Type": "multipart/form-data"}  # no boundary
    error = assert_envelope(httpx.post(server.url + EDITS, content=b"prompt=x", headers=headers, timeout=60), 400)
    assert error["code"] == "invalid_multipart" and "boundary" in error["message"], error
