"""Every endpoint of both APIs over real HTTP (uvicorn on loopback, httpx), serving the random tiny model."""

from __future__ import annotations

import base64
import inspect
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from diffusers import StableDiffusion3Pipeline
from http_helpers import NATIVE, OPENAI, assert_envelope, fetch_png, open_png, openai_images, pixels
from jobs_helpers import stored_jobs

STEPS = 2  # denoising steps: enough to exercise the loop, cheap on the tiny model


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    """POST JSON (generation may take a moment on a busy machine)."""
    return httpx.post(url + path, json=body, timeout=120, **kwargs)


def generate(url: str, path: str = NATIVE, **body: Any) -> dict[str, Any]:
    """A successful generation's JSON answer."""
    response = post(url, path, {"prompt": "a red fox", "num_inference_steps": STEPS, **body})
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------------------------------------------------
# Service endpoints
# ---------------------------------------------------------------------------------------------------------


def test_welcome_health_ready_and_models(make_server: Callable[..., Any]) -> None:
    server = make_server()
    root = httpx.get(server.url + "/")
    assert root.status_code == 200
    assert root.json()["model"] == "random:tiny"
    assert NATIVE in root.json()["message"] and OPENAI in root.json()["message"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["random:tiny"]
    assert all(m["object"] == "model" for m in models["data"])


def test_status_fields_and_request_count(make_server: Callable[..., Any]) -> None:
    server = make_server()
    before = httpx.get(server.url + "/api/status").json()
    assert before["current_model"] == "random:tiny"
    assert before["type_models"] == "t2im"
    assert before["device"] == "cpu"
    assert before["memory"]["process_rss_bytes"] > 0
    assert (before["active_inferences"], before["queued"]) == (0, 0)
    generate(server.url)
    generate(server.url, OPENAI, size="64x64")
    after = httpx.get(server.url + "/api/status").json()
    assert after["total_requests"] == before["total_requests"] + 2
    assert (after["active_inferences"], after["queued"]) == (0, 0)
    assert after["requests"]["completed"] == before["requests"]["completed"] + 2


# ---------------------------------------------------------------------------------------------------------
# Native API
# ---------------------------------------------------------------------------------------------------------


def test_native_generation_answers_absolute_urls_of_pngs(make_server: Callable[..., Any]) -> None:
    server = make_server()
    response = post(
        server.url,
        NATIVE,
        {
            "prompt": "a red fox",
            "num_inference_steps": STEPS,
            "seed": 123,
            "width": 96,
            "height": 48,
            "guidance_scale": 3.5,
        },
        headers={"X-Request-ID": "my-request-1"},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["seed"] == 123 and response.headers["x-seed"] == "123"
    assert answer["request_id"] == "my-request-1" == response.headers["x-request-id"]
    assert answer["parameters"] == {
        "prompt": "a red fox",
        "negative_prompt": None,
        "num_inference_steps": STEPS,
        "num_images_per_prompt": 1,
        "guidance_scale": 3.5,
        "height": 48,
        "width": 96,
        "output_format": "png",
        "output_compression": 10,
        "task": "text-to-image",
        "strength": None,
        "mask_blur": None,
        "loras": [],
    }
    [url] = answer["response"]
    assert url.startswith(server.url + "/images/") and url.endswith(".png")
    assert open_png(fetch_png(url)).size == (96, 48)


def test_native_defaults_are_resolved_and_reported(make_server: Callable[..., Any]) -> None:
    server = make_server()  # stock settings: 28 steps; the tiny model's native size is 64x64
    answer = post(server.url, NATIVE, {"prompt": "a red fox"}).json()
    params = answer["parameters"]
    assert (params["num_inference_steps"], params["height"], params["width"]) == (28, 64, 64)
    assert params["num_images_per_prompt"] == 1
    assert 0 <= answer["seed"] < 2**32  # drawn by the server, returned so the image can be reproduced
    image = fetch_png(answer["response"][0])
    assert open_png(image).size == (64, 64)
    # The guidance scale used: the pipeline's own default, reported, and the image is the one that value gives.
    default = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["guidance_scale"].default
    assert isinstance(params["guidance_scale"], float) and params["guidance_scale"] == default
    explicit = {"prompt": "a red fox", "seed": answer["seed"], "guidance_scale": default}
    assert fetch_png(post(server.url, NATIVE, explicit).json()["response"][0]) == image

    custom = make_server(default_steps=3)
    assert post(custom.url, NATIVE, {"prompt": "a red fox"}).json()["parameters"]["num_inference_steps"] == 3


def test_several_images_per_prompt(make_server: Callable[..., Any]) -> None:
    server = make_server()
    answer = generate(server.url, num_images_per_prompt=3, seed=5)
    assert len(answer["response"]) == 3 == len(set(answer["response"]))
    decoded = [pixels(fetch_png(url)) for url in answer["response"]]
    assert all(size == (64, 64) for size, _ in decoded)
    assert len({data for _, data in decoded}) == 3  # one seed, three different images


def test_urls_are_built_from_the_requests_host(make_server: Callable[..., Any]) -> None:
    server = make_server()
    port = urlparse(server.url).port
    response = post(
        server.url, NATIVE, {"prompt": "a fox", "num_inference_steps": STEPS}, headers={"Host": f"localhost:{port}"}
    )
    [url] = response.json()["response"]
    assert url.startswith(f"http://localhost:{port}/images/")
    open_png(fetch_png(url))  # the URL as given works from the client's side

    elsewhere = post(
        server.url, NATIVE, {"prompt": "a fox", "num_inference_steps": STEPS}, headers={"Host": "img.example:8080"}
    )
    [url] = elsewhere.json()["response"]
    assert url.startswith("http://img.example:8080/images/")
    assert "0.0.0.0" not in url


def test_public_url_setting_is_used_for_links(make_server: Callable[..., Any]) -> None:
    server = make_server(public_url="https://img.example.com/sd/")
    for path in (NATIVE, OPENAI):
        [url] = [item if isinstance(item, str) else item["url"] for item in _urls(generate(server.url, path))]
        prefix = "https://img.example.com/sd/images/"
        assert url.startswith(prefix)
        # The same name is served here (the proxy at the public URL would forward to us).
        open_png(fetch_png(f"{server.url}/images/{url[len(prefix) :]}"))


def _urls(answer: dict[str, Any]) -> list[Any]:
    return answer["response"] if "response" in answer else answer["data"]


def test_image_endpoint_serves_pngs_and_404s_in_the_envelope(make_server: Callable[..., Any]) -> None:
    server = make_server()
    [url] = generate(server.url)["response"]
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    open_png(response.content)
    missing = httpx.get(f"{server.url}/images/{'0' * 32}.png")
    assert assert_envelope(missing, 404, "filename")["code"] == "image_not_found"
    for name in ("nothere.png", "..%2Fserverasync.py", "%2e%2e%2f%2e%2e%2fpyproject.toml"):
        assert_envelope(httpx.get(f"{server.url}/images/{name}"), 404)
    assert_envelope(httpx.get(server.url + "/no/such/route"), 404)


def test_api_key_guards_generation(make_server: Callable[..., Any]) -> None:
    server = make_server(api_key="sesame")
    body = {"prompt": "a fox", "num_inference_steps": STEPS}
    for path in (NATIVE, OPENAI):
        error = assert_envelope(post(server.url, path, body), 401)
        assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]
        assert_envelope(post(server.url, path, body, headers={"Authorization": "Bearer wrong"}), 401)
        assert post(server.url, path, body, headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes stay open (tests/test_middleware.py)


# ---------------------------------------------------------------------------------------------------------
# OpenAI Images API
# ---------------------------------------------------------------------------------------------------------


def test_openai_url_and_b64_json(make_server: Callable[..., Any]) -> None:
    server = make_server()
    as_url = generate(server.url, OPENAI, size="96x48", response_format="url")
    assert isinstance(as_url["created"], int)
    [item] = as_url["data"]
    assert set(item) == {"url"} and item["url"].startswith(server.url + "/images/")
    as_b64 = generate(server.url, OPENAI, size="96x48", response_format="b64_json")
    [item] = as_b64["data"]
    assert set(item) == {"b64_json"}
    assert open_png(base64.b64decode(item["b64_json"])).size == (96, 48)
    assert [open_png(png).size for png in openai_images(as_url)] == [(96, 48)]


def test_openai_n_size_and_extra_fields(make_server: Callable[..., Any]) -> None:
    server = make_server()
    answer = generate(
        server.url,
        OPENAI,
        n=2,
        size="48x80",
        model="dall-e-3",
        quality="hd",
        style="vivid",
        user="user-1234",
        response_format="url",
    )
    images = [pixels(png) for png in openai_images(answer)]
    assert [size for size, _ in images] == [(48, 80), (48, 80)]
    assert images[0][1] != images[1][1]
    default = openai_images(generate(server.url, OPENAI, size="auto", response_format="b64_json"))
    assert open_png(default[0]).size == (64, 64)


# ---------------------------------------------------------------------------------------------------------
# Reproducibility: same seed and parameters -> same pixels, on both APIs
# ---------------------------------------------------------------------------------------------------------


def test_seed_reproducibility_through_http(make_server: Callable[..., Any]) -> None:
    server = make_server()

    def native(seed: int) -> tuple[tuple[int, int], bytes]:
        answer = generate(server.url, seed=seed, width=64, height=48, negative_prompt="blurry")
        assert answer["seed"] == seed
        return pixels(fetch_png(answer["response"][0]))

    def openai(seed: int, response_format: str) -> tuple[tuple[int, int], bytes]:
        answer = generate(
            server.url, OPENAI, seed=seed, size="64x48", negative_prompt="blurry", response_format=response_format
        )
        return pixels(openai_images(answer)[0])

    first = native(42)
    assert native(42) == first
    assert openai(42, "b64_json") == first  # both APIs map to the same generation
    assert openai(42, "url") == first
    assert native(43)[1] != first[1]
    assert openai(43, "b64_json")[1] != first[1]


# ---------------------------------------------------------------------------------------------------------
# Bad input: 4xx, the envelope, a message saying how to fix it; never a 500
# ---------------------------------------------------------------------------------------------------------

LONG_PROMPT = "a" * 2001  # the default --max-prompt-chars is 2000

BAD_JSON: list[tuple[str, str, Any, str | None, str]] = [
    # (id, path, body, param, words the message must contain)
    ("missing prompt", NATIVE, {"num_inference_steps": 2}, "prompt", "required"),
    ("blank prompt", NATIVE, {"prompt": "   "}, "prompt", "blank"),
    ("too long prompt", NATIVE, {"prompt": LONG_PROMPT}, "prompt", "at most 2000 characters"),
    ("too long negative", NATIVE, {"prompt": "x", "negative_prompt": LONG_PROMPT}, "negative_prompt", "at most 2000"),
    ("steps 0", NATIVE, {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "between 1 and 100"),
    # Past the schema's hard bound (1000) as well: still the configured limit, never "<= 1000".
    ("steps 5000", NATIVE, {"prompt": "x", "num_inference_steps": 5000}, "num_inference_steps", "between 1 and 100"),
    (
        "images 1000",
        NATIVE,
        {"prompt": "x", "num_images_per_prompt": 1000},
        "num_images_per_prompt",
        "between 1 and 10",
    ),
    (
        "steps above max",
        NATIVE,
        {"prompt": "x", "num_inference_steps": 101},
        "num_inference_steps",
        "between 1 and 100",
    ),
    ("steps as boolean", NATIVE, {"prompt": "x", "num_inference_steps": True}, "num_inference_steps", "integer"),
    ("seed as string", NATIVE, {"prompt": "x", "seed": "5"}, "seed", "integer"),
    ("n as float", OPENAI, {"prompt": "x", "n": 1.5}, "n", "integer"),
    ("width not /16", NATIVE, {"prompt": "x", "width": 70}, "width", "multiple of 16; try 64 or 80"),
    ("height not /16", NATIVE, {"prompt": "x", "height": 100}, "height", "multiple of 16; try 96 or 112"),
    ("width below min", NATIVE, {"prompt": "x", "width": 8}, "width", "between 16 and 1024 pixels"),
    ("width past the hard bound", NATIVE, {"prompt": "x", "width": 9000}, "width", "between 16 and 1024 pixels"),
    ("height above max", NATIVE, {"prompt": "x", "height": 2048}, "height", "between 16 and 1024 pixels"),
    # Within --max-image-size (1536) but past the tiny transformer's positional embedding (1024): was a 500.
    (
        "width above model max",
        NATIVE,
        {"prompt": "x", "width": 1088, "height": 64},
        "width",
        "between 16 and 1024 pixels",
    ),
    (
        "images above max",
        NATIVE,
        {"prompt": "x", "num_images_per_prompt": 11},
        "num_images_per_prompt",
        "between 1 and 10",
    ),
    (
        "images 0",
        NATIVE,
        {"prompt": "x", "num_images_per_prompt": 0},
        "num_images_per_prompt",
        "between 1 and 10",
    ),
    ("prompt not a string", NATIVE, {"prompt": 5}, "prompt", "valid string"),
    ("steps not an integer", NATIVE, {"prompt": "x", "num_inference_steps": "many"}, "num_inference_steps", "integer"),
    ("seed negative", NATIVE, {"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
    ("seed too large", NATIVE, {"prompt": "x", "seed": 2**32}, "seed", "less than or equal to"),
    ("seed fractional", NATIVE, {"prompt": "x", "seed": 1.5}, "seed", "integer"),
    (
        "guidance negative",
        NATIVE,
        {"prompt": "x", "guidance_scale": -1},
        "guidance_scale",
        "greater than or equal to 0",
    ),
    ("unknown field", NATIVE, {"prompt": "x", "steps": 2}, "steps", "unknown field"),
    ("body is an array", NATIVE, ["a fox"], None, "JSON object"),
    ("openai missing prompt", OPENAI, {"n": 1}, "prompt", "required"),
    ("openai n=11", OPENAI, {"prompt": "x", "n": 11}, "n", "between 1 and 10"),
    ("openai n=0", OPENAI, {"prompt": "x", "n": 0}, "n", "between 1 and 10"),
    ("openai steps 5000", OPENAI, {"prompt": "x", "num_inference_steps": 5000}, "num_inference_steps", "1 and 100"),
    ("openai size word", OPENAI, {"prompt": "x", "size": "large"}, "size", "WIDTHxHEIGHT"),
    ("openai size separator", OPENAI, {"prompt": "x", "size": "64*64"}, "size", "WIDTHxHEIGHT"),
    ("openai size not /16", OPENAI, {"prompt": "x", "size": "100x100"}, "size", "multiple of 16; try 96 or 112"),
    ("openai size too small", OPENAI, {"prompt": "x", "size": "8x64"}, "size", "between 16 and 1024 pixels"),
    ("openai size too large", OPENAI, {"prompt": "x", "size": "4096x4096"}, "size", "between 16 and 1024 pixels"),
    ("openai size not a string", OPENAI, {"prompt": "x", "size": 64}, "size", "valid string"),
    (
        "openai response_format",
        OPENAI,
        {"prompt": "x", "response_format": "png"},
        "response_format",
        "'url' or 'b64_json'",
    ),
    ("openai steps above max", OPENAI, {"prompt": "x", "num_inference_steps": 500}, "num_inference_steps", "1 and 100"),
    ("openai too long prompt", OPENAI, {"prompt": LONG_PROMPT}, "prompt", "at most 2000 characters"),
]


@pytest.fixture
def quiet_server(make_server: Callable[..., Any]) -> Iterator[Any]:
    """A server whose engine is checked to have run nothing after the bad requests."""
    server = make_server()
    yield server
    assert server.engine.stats["total"] == 0, "a rejected request reached the engine"


@pytest.mark.parametrize(
    ("path", "body", "param", "words"), [case[1:] for case in BAD_JSON], ids=[c[0] for c in BAD_JSON]
)
def test_bad_json_input_is_a_400_envelope(
    quiet_server: Any, path: str, body: Any, param: str | None, words: str
) -> None:
    error = assert_envelope(post(quiet_server.url, path, body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]
    assert "Traceback" not in error["message"] and LONG_PROMPT not in error["message"]


def test_out_of_range_answers_name_the_configured_limit_whichever_check_fails(make_server: Any) -> None:
    # Limits raised above the defaults: the schema's bound (64 images, 1000 steps) must never show through.
    server = make_server(max_images_per_request=20, max_steps=300, default_steps=2)
    cases = [
        (NATIVE, {"num_images_per_prompt": 21}, "num_images_per_prompt", "between 1 and 20"),  # configured check
        (NATIVE, {"num_images_per_prompt": 1000}, "num_images_per_prompt", "between 1 and 20"),  # schema's bound
        (NATIVE, {"num_inference_steps": 301}, "num_inference_steps", "between 1 and 300"),
        (NATIVE, {"num_inference_steps": 1001}, "num_inference_steps", "between 1 and 300"),
        (OPENAI, {"n": 15}, "n", "between 1 and 10"),  # the OpenAI API's own bound is the tighter one here
    ]
    for path, fields, param, words in cases:
        error = assert_envelope(post(server.url, path, {"prompt": "x", **fields}), 400, param)
        assert error["message"] == f"{param}: must be {words}", error["message"]


def test_a_request_larger_than_the_pixel_budget_is_a_400_at_once_whichever_api(make_server: Any) -> None:
    """--max-pixels-in-flight: a request whose images could never run at once is refused before any work, on both
    APIs and for a job (at creation, not as a failed job later); one that fits is served; /api/status shows it."""
    budget = 2 * 64 * 64
    server = make_server(max_pixels_in_flight=budget, default_steps=2)
    words = f"2 image(s) of 64x96 are 12288 pixels, more than this server generates at once ({budget}"
    for path, body, param in (
        (NATIVE, {"num_images_per_prompt": 2, "width": 64, "height": 96}, "num_images_per_prompt"),
        (OPENAI, {"n": 2, "size": "64x96"}, "n"),
        ("/api/jobs", {"num_images_per_prompt": 2, "width": 64, "height": 96}, "num_images_per_prompt"),
    ):
        error = assert_envelope(post(server.url, path, {"prompt": "x", **body}), 400, param)
        assert words in error["message"] and "--max-pixels-in-flight" in error["message"], error["message"]
    assert stored_jobs(server) == 0  # no job was made
    assert len(generate(server.url, num_images_per_prompt=2)["response"]) == 2  # 2 x 64x64: exactly the budget
    status = httpx.get(server.url + "/api/status").json()
    assert (status["max_pixels_in_flight"], status["pixels_running"]) == (budget, 0)
    assert status["requests"]["completed"] == 1 and status["requests"]["total"] == 1


def test_the_default_pixel_budget_is_one_largest_request(make_server: Any) -> None:
    server = make_server(max_image_size=512, max_images_per_request=4)
    assert httpx.get(server.url + "/api/status").json()["max_pixels_in_flight"] == 512 * 512 * 4


@pytest.mark.parametrize("path", [NATIVE, OPENAI])
def test_malformed_bodies_are_400_envelopes(quiet_server: Any, path: str) -> None:
    url = quiet_server.url + path
    json_type = {"Content-Type": "application/json"}
    error = assert_envelope(httpx.post(url, content=b'{"prompt": "a fox",', headers=json_type), 400)
    assert "not valid JSON" in error["message"]
    for empty in (httpx.post(url), httpx.post(url, content=b"", headers=json_type)):
        assert "JSON object" in assert_envelope(empty, 400)["message"]
    plain = httpx.post(url, content=b"a fox", headers={"Content-Type": "text/plain"})
    assert "JSON object" in assert_envelope(plain, 400)["message"]


def test_oversized_body_is_a_413_envelope(quiet_server: Any) -> None:
    # Over the 64 KiB --max-body-bytes of a route that takes no image (the native one takes images: its limit is
    # --max-upload-bytes, tests/test_edits_input.py).
    response = post(quiet_server.url, OPENAI, {"prompt": "a" * 70_000})
    assert "larger than 65536 bytes" in assert_envelope(response, 413)["message"]


def test_wrong_method_is_an_envelope_not_a_500(quiet_server: Any) -> None:
    wrong = httpx.get(quiet_server.url + NATIVE)
    assert_envelope(wrong, 405) and wrong.headers["allow"] == "POST"
    assert_envelope(httpx.delete(quiet_server.url + "/images/" + "0" * 32 + ".png"), 405)


@pytest.mark.parametrize("path", ["/api/jobs/", "/v1/models/", "/health/", NATIVE + "/", "/docs/", "/ui/"])
def test_a_trailing_slash_is_a_404_envelope_not_a_redirect(quiet_server: Any, path: str) -> None:
    with httpx.Client(base_url=quiet_server.url, timeout=30, follow_redirects=False) as client:
        for method in ("GET", "POST"):
            answer = client.request(method, path, json={"prompt": "x"})
            error = assert_envelope(answer, 404)
            assert "location" not in answer.headers and "trailing slash" in error["message"], (method, path)


def test_openapi_publishes_the_configured_limits(make_server: Any) -> None:
    server = make_server(
        max_steps=7, default_steps=2, max_images_per_request=3, max_image_size=256, max_prompt_chars=50
    )
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    native, openai_body = schemas["InferenceRequest"]["properties"], schemas["OpenAIImageRequest"]["properties"]
    assert native["num_inference_steps"]["anyOf"][0]["maximum"] == 7
    assert native["num_images_per_prompt"]["maximum"] == 3
    assert native["width"]["anyOf"][0]["maximum"] == 256 and native["height"]["anyOf"][0]["maximum"] == 256
    assert native["prompt"]["maxLength"] == 50
    assert openai_body["n"]["maximum"] == 3 and openai_body["num_inference_steps"]["anyOf"][0]["maximum"] == 7
    # The schema is what the server enforces: one step past the published bound is refused.
    answer = httpx.post(f"{server.url}/api/diffusers/inference", json={"prompt": "x", "num_inference_steps": 8})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "num_inference_steps"
