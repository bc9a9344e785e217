"""The A1111 API against the exact sequences real clients send, taken from their source, and its edges (options,
lists, refused fields, HTTP Basic, unknown routes in the log).

- Open WebUI (``backend/open_webui/routers/images.py``, automatic1111 engine): ``GET /sdapi/v1/options`` (its URL
  check, and the model it reads), ``GET /sdapi/v1/sd-models`` (its model menu: ``title`` as the id), setting the
  model (``GET`` the options, then ``POST`` them back with ``sd_model_checkpoint`` changed, when it differs: an empty
  model too), then ``POST /sdapi/v1/txt2img`` with ``batch_size``, and every image read as Open WebUI reads it (split
  on the first comma if there is one, else the whole string is base64 PNG) with ``info`` stored beside. Its
  ``Authorization`` header is ``Basic base64(API Auth)``, or empty when none is configured. Open WebUI itself is not
  installed here (it needs hundreds of megabytes of dependencies): its requests are reproduced from its source
  (checked against open-webui 0.12.4's wheel), request for request.
- LibreChat (``api/app/clients/tools/structured/StableDiffusion.js``): its one txt2img payload, then
  ``JSON.parse(info)``, ``info.infotexts[0].split('\\n').pop()`` and ``image.split(',', 1)[0]`` as base64.
- Open WebUI's OpenAI engine names ``gpt-image-*`` models without a ``response_format`` and reads ``b64_json``.

One server without a key and one with ``--api-key`` for the module, both threads engine on the session's pipeline.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import LiveServer, tiny_loader, wait_ready
from http_helpers import assert_envelope, open_png
from PIL import Image

KEY = "a1111:s3cret"  # as A1111's --api-auth was: user:password
TXT2IMG = "/sdapi/v1/txt2img"


def _serve(tiny_pipeline: Any, tmp: Any, **options: Any) -> LiveServer:
    from serverasync import Settings, create_app

    settings = Settings(model="random:tiny", image_dir=str(tmp / "images"), max_images_per_request=4, **options)
    live = LiveServer(create_app(settings, loader=tiny_loader(tiny_pipeline)))
    wait_ready(live.url)
    return live


@pytest.fixture(scope="module")
def server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = _serve(tiny_pipeline, tmp_path_factory.mktemp("open"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def guarded(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = _serve(tiny_pipeline, tmp_path_factory.mktemp("guarded"), api_key=KEY)
    yield live
    live.stop()


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def _open_webui_image_data(data: str) -> tuple[bytes, str]:
    """Open WebUI's ``get_image_data`` for a string that is not a URL."""
    if "," in data:
        header, encoded = data.split(",", 1)
        return base64.b64decode(encoded), header.split(";")[0].removeprefix("data:")
    return base64.b64decode(data), "image/png"


def _open_webui_generates(url: str, api_auth: str | None, model: str) -> list[bytes]:
    """Open WebUI's automatic1111 engine, request for request: verify_url, get_models, set_image_model(model),
    get_image_model, then image_generations for n=2 at 64x64 with steps and a negative prompt."""
    headers = {"authorization": "" if api_auth is None else _basic(api_auth)}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as session:
        session.get("/sdapi/v1/options").raise_for_status()  # verify_url
        models = [{"id": m["title"], "name": m["model_name"]} for m in session.get("/sdapi/v1/sd-models").json()]
        assert models == [{"id": "random:tiny", "name": "random:tiny"}]
        options = session.get("/sdapi/v1/options").json()  # set_image_model
        if model != options["sd_model_checkpoint"]:
            options["sd_model_checkpoint"] = model
            session.post("/sdapi/v1/options", json=options).raise_for_status()
        assert session.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "random:tiny"  # get_image_model
        data = {"prompt": "a lighthouse", "batch_size": 2, "width": 64, "height": 64, "steps": 2}
        data["negative_prompt"] = "fog"
        res = session.post(TXT2IMG, json=data).json()  # its status is never checked: the body must say it all
    images = []
    for image in res["images"]:
        content, content_type = _open_webui_image_data(image)
        assert content_type == "image/png"
        images.append(content)
    assert isinstance(res["info"], str)  # stored beside each image
    return images


@pytest.mark.parametrize("model", ["random:tiny", ""])
def test_open_webui_generates_with_its_api_auth(guarded: LiveServer, model: str) -> None:
    images = _open_webui_generates(guarded.url, KEY, model)
    assert len(images) == 2 and all(open_png(image).size == (64, 64) for image in images)


def _status_with(url: str, path: str, authorization: bytes) -> int:
    """The status of a GET sent with this exact Authorization header, bytes as given: httpx refuses a value with
    trailing space, which aiohttp (Open WebUI's client) sends as it is for an empty API Auth."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + authorization + b"\r\n\r\n")
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_open_webui_without_api_auth_sends_an_empty_header_a_keyless_server_ignores(server: LiveServer) -> None:
    assert len(_open_webui_generates(server.url, None, "random:tiny")) == 2
    assert _status_with(server.url, "/sdapi/v1/options", b"Basic ") == 200


def test_with_a_key_an_empty_basic_header_is_refused(guarded: LiveServer) -> None:
    assert _status_with(guarded.url, "/sdapi/v1/options", b"Basic ") == 401


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (_basic(KEY), 200),  # A1111's --api-auth user:password, the key as a whole
        (_basic(f"anyone:{KEY}"), 200),  # the key as the password, any user
        (f"Bearer {KEY}", 200),
        (_basic("a1111:wrong"), 401),
        ("Basic", 401),
        ("Basic %%%", 401),
        ("", 401),
    ],
)
def test_basic_credentials_carrying_the_key_open_the_a1111_routes(
    guarded: LiveServer, authorization: str, status: int
) -> None:
    answer = httpx.get(guarded.url + "/sdapi/v1/sd-models", headers={"Authorization": authorization})
    assert answer.status_code == status, answer.text
    if status == 401:
        assert answer.headers["www-authenticate"] == 'Basic realm="sdapi"'
        assert "HTTP Basic" in assert_envelope(answer, 401)["message"]


def test_basic_credentials_open_only_the_a1111_routes(guarded: LiveServer) -> None:
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": _basic(KEY)}).status_code == 401
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_librechats_stable_diffusion_tool(server: LiveServer) -> None:
    # Its payload as it is, but for the steps: 22 steps at 1024x1024 take most of a minute on this CPU even with
    # random:tiny; one step exercises the same size, answer and parsing.
    payload = {"prompt": "a fox", "negative_prompt": "blurry", "cfg_scale": 4.5, "steps": 22, "width": 1024}
    payload.update(height=1024, steps=1)
    data = httpx.post(server.url + TXT2IMG, json=payload, timeout=300).json()
    image = data["images"][0]
    info = json.loads(data["info"])
    buffer = base64.b64decode(image.split(",", 1)[0])
    assert open_png(buffer).size == (1024, 1024) and (info["height"], info["width"]) == (1024, 1024)
    assert isinstance(info["seed"], int) and info["all_seeds"] == [info["seed"]]
    generation_info = info["infotexts"][0].split("\n").pop()
    assert generation_info.startswith("Steps: 1, Sampler: Euler, Schedule type: Automatic, CFG scale: 4.5, Seed: ")
    assert info["infotexts"][0].split("\n")[:2] == ["a fox", "Negative prompt: blurry"]


def test_open_webuis_openai_engine_gets_base64_for_gpt_image_models(server: LiveServer) -> None:
    """It sends no response_format for gpt-image-* (OpenAI answers those in base64 only) and would refuse to fetch a
    URL on a private address; dall-e-* names still get URLs, and an explicit response_format wins."""
    body = {"prompt": "a fox", "n": 1, "size": "32x32", "num_inference_steps": 1}
    gpt = httpx.post(server.url + "/v1/images/generations", json={**body, "model": "gpt-image-1"}, timeout=60).json()
    assert set(gpt["data"][0]) == {"b64_json"} and open_png(base64.b64decode(gpt["data"][0]["b64_json"]))
    dalle = httpx.post(server.url + "/v1/images/generations", json={**body, "model": "dall-e-3"}, timeout=60).json()
    assert set(dalle["data"][0]) == {"url"}
    asked = {**body, "model": "gpt-image-1", "response_format": "url"}
    assert set(httpx.post(server.url + "/v1/images/generations", json=asked, timeout=60).json()["data"][0]) == {"url"}
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    files = {"image": ("in.png", buffer.getvalue(), "image/png")}
    edit = httpx.post(server.url + "/v1/images/edits", data={"prompt": "a fox", "model": "gpt-image-1",
                      "num_inference_steps": "2"}, files=files, timeout=60)  # fmt: skip
    assert set(edit.json()["data"][0]) == {"b64_json"}, edit.text


def test_options_name_the_checkpoint_and_the_lists_fill_the_menus(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=60) as client:
        for title in ("random:tiny [0123abcd]", "random:tiny", ""):
            assert client.post("/options", json={"sd_model_checkpoint": title}).status_code == 200
            assert client.get("/options").json()["sd_model_checkpoint"] == "random:tiny"
        error = assert_envelope(client.post("/options", json={"sd_model_checkpoint": "sdxl.safetensors"}), 400)
        assert "'sdxl.safetensors'" in error["message"] and "'random:tiny'" in error["message"]
        assert_envelope(client.post("/options", json={"CLIP_stop_at_last_layers": 2}), 400, "CLIP_stop_at_last_layers")
        assert client.post("/options", json={"samples_format": "webp", "not_an_option": 1}).status_code == 200
        try:
            webp = client.post("/txt2img", json={"prompt": "a fox", "steps": 1, "width": 32, "height": 32})
            assert base64.b64decode(webp.json()["images"][0])[8:12] == b"WEBP"
        finally:
            client.post("/options", json={"samples_format": "png"})
        [model] = client.get("/sd-models").json()
        assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert [s["name"] for s in client.get("/samplers").json()] == ["Euler"]
        assert [s["label"] for s in client.get("/schedulers").json()] == ["Automatic"]
        for empty in ("/upscalers", "/latent-upscale-modes", "/sd-vae", "/prompt-styles", "/loras"):
            assert client.get(empty).json() == [], empty
        assert client.get("/scripts").json() == {"txt2img": [], "img2img": []}
    assert 'api="a1111"' in httpx.get(server.url + "/metrics").text


# What A1111's own /docs sends as txt2img's example body: every field, at A1111's defaults.
A1111_DEFAULTS: dict[str, Any] = {
    "prompt": "a fox", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler", "scheduler": "Automatic",
    "batch_size": 1, "n_iter": 1, "steps": 1, "cfg_scale": 7, "width": 32, "height": 32, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": 0, "denoising_strength": 0.75,
    "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": 0,
    "disable_extra_networks": False, "firstpass_image": None, "comments": {}, "enable_hr": False,
    "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "force_task_id": None, "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "alwayson_scripts": {}, "infotext": None,
}  # fmt: skip


def test_a1111_defaults_are_accepted_and_what_cannot_apply_is_refused_by_name(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        plain = client.post(TXT2IMG, json=A1111_DEFAULTS)
        assert plain.status_code == 200, plain.text
        info = json.loads(plain.json()["info"])
        assert 0 <= info["seed"] < 2**32 and info["ignored_settings"] == []
        wrong = {**A1111_DEFAULTS, "enable_hr": True, "restore_faces": True, "alwayson_scripts": {"controlnet": {}}}
        error = assert_envelope(client.post(TXT2IMG, json=wrong), 400, "restore_faces")
        assert all(name in error["message"] for name in ("enable_hr", "restore_faces", "alwayson_scripts"))
        clip = {**A1111_DEFAULTS, "override_settings": {"CLIP_stop_at_last_layers": 2}}
        assert_envelope(client.post(TXT2IMG, json=clip), 400, "override_settings.CLIP_stop_at_last_layers")
        too_many = {**A1111_DEFAULTS, "batch_size": 3, "n_iter": 2}
        assert "6 images" in assert_envelope(client.post(TXT2IMG, json=too_many), 400, "batch_size")["message"]
        assert_envelope(client.post(TXT2IMG, json={**A1111_DEFAULTS, "seed": 2**32 - 1, "batch_size": 2}), 400, "seed")
        sampled = {**A1111_DEFAULTS, "seed": 9, "override_settings": {"sd_vae": "Automatic", "token_merging": 0}}
        euler = client.post(TXT2IMG, json=sampled).json()
        other = client.post(TXT2IMG, json={**sampled, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}).json()
    assert euler["images"] == other["images"]  # what runs is Euler either way, and the answer says so
    info = json.loads(other["info"])
    assert info["sampler_name"] == "Euler" and info["ignored_settings"] == ["token_merging"]
    assert "Requested sampler: DPM++ 2M, Requested schedule type: Karras" in info["infotexts"][0]


def test_unknown_routes_and_refused_keys_leave_a_line_in_the_log(
    make_server: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    live = make_server(api_key=KEY)  # its own: the lines are rate-limited per server, per kind
    caplog.set_level(logging.INFO, logger="api.misses")
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert_envelope(httpx.get(live.url + "/sdapi/v1/no-such-route?x=1", headers=bearer), 404)
    assert_envelope(httpx.post(live.url + "/sdapi/v1/txt2img", json={}), 401)
    lines = [record.getMessage() for record in caplog.records if record.name == "api.misses"]
    assert any("no route" in line and "404 for GET '/sdapi/v1/no-such-route'" in line for line in lines), lines
    assert any("no valid API key" in line and "401 for POST '/sdapi/v1/txt2img'" in line for line in lines), lines


def test_img2img_refuses_what_it_cannot_read(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert_envelope(client.post("/sdapi/v1/img2img", json={"prompt": "a fox"}), 400, "init_images")
        bad = client.post("/sdapi/v1/img2img", json={"prompt": "a fox", "init_images": ["not base64!"]})
        assert_envelope(bad, 400, "init_images[0]")
        with pytest.raises(binascii.Error):
            base64.b64decode("not base64!", validate=True)
        blur = {"prompt": "a fox", "init_images": ["AAAA"], "mask": "AAAA", "mask_blur_x": 2, "mask_blur_y": 6}
        assert_envelope(client.post("/sdapi/v1/img2img", json=blur), 400, "mask_blur_x")
