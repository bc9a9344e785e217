"""Input images are checked before they cost anything (api/images_in.py), through a real server on loopback.

Every bad input is a 400 (or 413) in the error envelope and never reaches the engine; each check has its case here
(without the check the case gets another answer: a 500, a 200, or the engine's work). The server never fetches a
remote URL, and decoding runs off the event loop.
"""

from __future__ import annotations

import base64
import io
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from edits_helpers import (
    EDITS,
    VARIATIONS,
    animated,
    data_url,
    encoded,
    noise,
    openai_mask,
    raw_png,
    rgb16_png,
)
from http_helpers import NATIVE, OPENAI, assert_envelope
from PIL import Image

from api import Settings, create_app

UPLOAD_LIMIT = 300_000
MAX_INPUT_SIDE = 256
FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One server for the module: small upload and input limits, so that passing them is cheap."""
    from conftest import LiveServer, tiny_loader, wait_ready

    settings = Settings(
        model="random:tiny",
        image_dir=str(tmp_path_factory.mktemp("edit-input-images")),
        data_dir=str(tmp_path_factory.mktemp("edit-input-data")),
        max_upload_bytes=UPLOAD_LIMIT,
        max_input_side=MAX_INPUT_SIDE,
    )
    live = LiveServer(create_app(settings, loader=tiny_loader(tiny_pipeline)))
    wait_ready(live.url)
    yield live
    live.stop()


@pytest.fixture
def untouched(server: Any) -> Iterator[Any]:
    """The server, checked to have run nothing more during the test."""
    before = server.engine.stats["total"]
    yield server
    assert server.engine.stats["total"] == before, "a refused request reached the engine"


def edit(server: Any, image: bytes, mask: bytes | None = None, **fields: Any) -> httpx.Response:
    files = {"image": ("image.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    data = {"prompt": "a fox", **{k: str(v) for k, v in fields.items()}}
    return httpx.post(server.url + EDITS, files=files, data=data, timeout=60)


PNG_32 = encoded(noise(32, 32))
TRUNCATED = encoded(noise(64, 64))[:3000]
# 5000 x 5000: under PIL's decompression-bomb guard (89 million pixels), so only our own check refuses it. Its data
# is missing: decoding it would answer "truncated", so the answer shows the size was read before any decoding.
CLAIMS_5000 = raw_png(5000, 5000)
CLAIMS_BOMB = raw_png(100_000, 100_000)  # past PIL's guard too


@pytest.mark.parametrize(
    ("image", "words", "code"),
    [
        (b"hello, not an image", "not an image in a format this server reads", "invalid_image"),
        (encoded(noise(32, 32), "GIF"), "PNG, JPEG or WebP", "invalid_image"),
        (encoded(noise(32, 32), "BMP"), "PNG, JPEG or WebP", "invalid_image"),
        (CLAIMS_5000, f"is 5000x5000; the largest side accepted is {MAX_INPUT_SIDE}", "too_large"),
        (CLAIMS_BOMB, "far too large", "too_large"),
        (TRUNCATED, "truncated or corrupt", "invalid_image"),
        (animated("PNG"), "animated", "invalid_image"),
        (animated("WEBP"), "animated", "invalid_image"),
        (rgb16_png(), "16 bits per channel", "invalid_image"),
        (encoded(Image.new("I;16", (16, 16))), "16 bits per channel", "invalid_image"),
        (b"", "is empty", "invalid_image"),
    ],
    ids=[
        "text",
        "gif",
        "bmp",
        "claims-5000",
        "claims-bomb",
        "truncated",
        "apng",
        "animated-webp",
        "rgb16",
        "gray16",
        "empty",
    ],
)
def test_bad_images_are_400_before_the_engine(untouched: Any, image: bytes, words: str, code: str) -> None:
    error = assert_envelope(edit(untouched, image, **FAST), 400, "image")
    assert words in error["message"] and error["code"] == code, error
    # The same checks on the native API's base64 field.
    native = httpx.post(untouched.url + NATIVE, json={"prompt": "a fox", "image": data_url(image)}, timeout=60)
    assert words in assert_envelope(native, 400, "image")["message"]


def test_a_mask_must_be_the_images_size_and_have_alpha(untouched: Any) -> None:
    wrong_size = encoded(openai_mask((48, 32), (0, 0, 8, 8)))
    error = assert_envelope(edit(untouched, PNG_32, wrong_size), 400, "mask")
    assert "is 48x32 and the image 32x32: they must be the same size" in error["message"]
    body = {"prompt": "x", "image": data_url(PNG_32), "mask_image": data_url(encoded(Image.new("L", (16, 32))))}
    error = assert_envelope(httpx.post(untouched.url + NATIVE, json=body, timeout=60), 400, "mask_image")
    assert "is 16x32 and the image 32x32" in error["message"]


def _palette_with_transparency() -> bytes:
    """A palette PNG whose colour 0 is transparent (a tRNS chunk): transparency without an alpha band."""
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 255, 255, 255])
    image.paste(0, (8, 8, 24, 24))
    return encoded(image, transparency=0)


def _white_on_transparent() -> bytes:
    """White strokes on a transparent background, as a canvas exports them: white repaints in one convention,
    transparent is edited in the other (the very opposite)."""
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (8, 8, 24, 24))
    return encoded(mask)


NATIVE_SAYS = ("transparent pixels", "white repaints, black keeps", "/v1/images/edits", "alpha 0")
OPENAI_SAYS = ("fully transparent pixels (alpha 0) are edited", "white-on-black", "/api/diffusers/inference")


@pytest.mark.parametrize(
    "mask",
    [
        encoded(openai_mask((32, 32), (8, 8, 24, 24))),
        _white_on_transparent(),
        encoded(Image.new("LA", (32, 32), (255, 128))),
        _palette_with_transparency(),
    ],
    ids=["openai-mask", "white-on-transparent", "half-transparent-LA", "palette-tRNS"],
)
def test_the_native_api_refuses_a_mask_with_transparency(untouched: Any, mask: bytes) -> None:
    """The native API reads a mask by its brightness: a transparent one would be misread (OpenAI's, sent here, was
    read as all black and answered 200). Refused, with both conventions named, on the sync route and on jobs."""
    for path in (NATIVE, "/api/jobs"):
        body = {"prompt": "a fox", "image": data_url(PNG_32), "mask_image": data_url(mask), **FAST}
        error = assert_envelope(httpx.post(untouched.url + path, json=body, timeout=60), 400, "mask_image")
        assert error["code"] == "invalid_mask" and all(words in error["message"] for words in NATIVE_SAYS), error


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (encoded(Image.new("RGB", (32, 32), "white")), "has no alpha channel"),
        (encoded(Image.new("L", (32, 32), 255)), "has no alpha channel"),
        (encoded(Image.new("RGBA", (32, 32), (255, 255, 255, 255))), "has no fully transparent pixel"),
        (encoded(Image.new("RGBA", (32, 32), (0, 0, 0, 254))), "has no fully transparent pixel"),
    ],
    ids=["rgb", "grey", "opaque-rgba", "almost-opaque-rgba"],
)
def test_openai_edits_refuse_a_mask_with_nothing_transparent(untouched: Any, mask: bytes, words: str) -> None:
    """OpenAI's convention edits the fully transparent pixels: a mask with none (a white-on-black one, diffusers'
    convention) would edit nothing. Refused, with both conventions named, in multipart and in JSON."""
    error = assert_envelope(edit(untouched, PNG_32, mask), 400, "mask")
    assert error["code"] == "invalid_mask" and words in error["message"], error
    assert all(each in error["message"] for each in OPENAI_SAYS), error
    body = {"prompt": "a fox", "images": [{"image_url": data_url(PNG_32)}], "mask": {"image_url": data_url(mask)}}
    error = assert_envelope(httpx.post(untouched.url + EDITS, json=body, timeout=60), 400, "mask")
    assert error["code"] == "invalid_mask" and words in error["message"], error


def test_an_opaque_rgba_mask_is_read_by_its_brightness(server: Any) -> None:
    """An RGBA mask with no transparent pixel carries nothing in its alpha: the native API reads its grey levels,
    the same inpainting as the same mask in L."""
    box = Image.new("L", (32, 32), 0)
    box.paste(255, (8, 8, 24, 24))
    answers = []
    for mask in (box, box.convert("RGBA")):
        body = {"prompt": "a fox", "image": data_url(PNG_32), "mask_image": data_url(encoded(mask)), "seed": 1, **FAST}
        answer = httpx.post(server.url + NATIVE, json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["parameters"]["task"] == "inpainting", answer.text
        answers.append(httpx.get(answer.json()["response"][0], timeout=60).content)
    assert Image.open(io.BytesIO(answers[0])).tobytes() == Image.open(io.BytesIO(answers[1])).tobytes()


def test_uploads_have_their_own_body_limit(server: Any) -> None:
    """Past --max-body-bytes (64 KiB) but within --max-upload-bytes: an upload is read; past that, 413."""
    big = encoded(noise(160, 160))  # about 77 KB of noise: more than the JSON limit
    assert 65_536 < len(big) < UPLOAD_LIMIT
    answer = edit(server, big, size="32x32", response_format="b64_json", **FAST)
    assert answer.status_code == 200, answer.text
    too_big = encoded(noise(MAX_INPUT_SIDE, MAX_INPUT_SIDE))  # about 197 KB; with base64 in JSON, past the limit
    native = {"prompt": "x", "image": data_url(too_big + too_big)}
    for response in (
        edit(server, too_big + too_big),
        httpx.post(server.url + VARIATIONS, files={"image": too_big + too_big}, timeout=60),
        httpx.post(server.url + NATIVE, json=native, timeout=60),
    ):
        assert f"larger than {UPLOAD_LIMIT} bytes" in assert_envelope(response, 413)["message"]
    # The routes that take no image keep the JSON limit.
    text_only = httpx.post(server.url + OPENAI, json={"prompt": "x", "user": "u" * 70_000}, timeout=60)
    assert "larger than 65536 bytes" in assert_envelope(text_only, 413)["message"]


def test_exif_orientation_is_honoured(server: Any) -> None:
    """A portrait photo stored landscape with an EXIF rotation is edited upright: its size is the upright one."""
    stored = noise(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    jpeg = encoded(stored, "JPEG", exif=exif.tobytes(), quality=95)
    answer = httpx.post(
        server.url + EDITS,
        files={"image": ("photo.jpg", jpeg, "image/jpeg")},
        data={"prompt": "a fox", "response_format": "b64_json", **FAST},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["size"] == "32x48"
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert image.size == (32, 48)


@pytest.mark.parametrize(
    "image_url",
    ["http://127.0.0.1:{port}/fox.png", "https://127.0.0.1:{port}/fox.png", "HTTP://127.0.0.1:{port}/a"],
)
def test_remote_urls_are_refused_and_never_fetched(untouched: Any, image_url: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = image_url.format(port=listener.getsockname()[1])
        bodies = [
            (EDITS, {"prompt": "a fox", "images": [{"image_url": url}]}, "images"),
            (
                EDITS,
                {"prompt": "a fox", "images": [{"image_url": data_url(PNG_32)}], "mask": {"image_url": url}},
                "mask",
            ),
            (NATIVE, {"prompt": "a fox", "image": url}, "image"),
        ]
        for path, body, param in bodies:
            error = assert_envelope(httpx.post(untouched.url + path, json=body, timeout=60), 400, param)
            assert "remote URLs are not fetched" in error["message"] and error["code"] == "unsupported_url"
        # Answered, and nothing ever connected to the URL's address (a fetch happens before the answer).
        assert select.select([listener], [], [], 0)[0] == [], "the server connected to the URL"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"images": [{"image_url": "file:///etc/passwd"}]}, "images", "only data: URLs"),
        ({"images": [{"image_url": "data:image/png,rawbytes"}]}, "images", "must be base64"),
        ({"images": [{"image_url": "not base64 at all!"}]}, "images", "not valid base64"),
        ({"images": [{"file_id": "file-123"}]}, "images", "file_id is not supported"),
        ({"images": []}, "images", "this field is required"),
        ({"images": [{"image_url": "x"}, {"image_url": "y"}]}, "images", "one image per request"),
        ({"image": "abc"}, "image", "multipart"),
    ],
    ids=["file-url", "data-not-base64", "not-base64", "file-id", "no-images", "two-images", "image-in-json"],
)
def test_bad_json_edits_are_400(untouched: Any, body: dict[str, Any], param: str, words: str) -> None:
    answer = httpx.post(untouched.url + EDITS, json={"prompt": "a fox", **body}, timeout=60)
    assert words in assert_envelope(answer, 400, param)["message"]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"background": "transparent"}, "background", "no alpha channel"),
        ({"input_fidelity": "high"}, "input_fidelity", "lower strength"),
        ({"markup": "x"}, "markup", "not supported"),
        ({"svg[model]": "x"}, "svg", "not supported"),
        ({"frame_count": "4"}, "frame_count", "not supported"),
        ({"output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({"n": "11"}, "n", "between 1 and 10"),
        ({"strength": "0"}, "strength", "greater than 0"),
        ({"strength": "1.5"}, "strength", "less than or equal to 1"),
        ({"strength": "1e-17", "num_inference_steps": "2"}, "strength", "runs no denoising step"),
        ({"size": "100x100"}, "size", "multiple of 16"),
        ({"stream": "maybe"}, "stream", "boolean"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"mask_blur": "2"}, "mask_blur", "send mask too"),
        ({"mask_blur": "65"}, "mask_blur", "must be between 0 and 64 pixels"),
        ({"mask_blur": "1.5"}, "mask_blur", "integer"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_edit_fields_are_400(untouched: Any, fields: dict[str, str], param: str, words: str) -> None:
    answer = httpx.post(untouched.url + EDITS, files={"image": PNG_32}, data={"prompt": "a fox", **fields}, timeout=60)
    assert words in assert_envelope(answer, 400, param)["message"]


def test_one_image_per_edit_and_the_media_types(untouched: Any) -> None:
    two = [("image[]", ("a.png", PNG_32, "image/png")), ("image[]", ("b.png", PNG_32, "image/png"))]
    answer = httpx.post(untouched.url + EDITS, files=two, data={"prompt": "a fox"}, timeout=60)
    error = assert_envelope(answer, 400, "image")
    assert "one image per request is supported here, not 2" in error["message"] and error["code"] == "too_many_images"
    missing = httpx.post(untouched.url + EDITS, files={"other": PNG_32}, data={"prompt": "a fox"}, timeout=60)
    assert "this field is required" in assert_envelope(missing, 400, "image")["message"]
    plain = httpx.post(untouched.url + EDITS, content=b"prompt=x", headers={"Content-Type": "text/plain"}, timeout=60)
    assert assert_envelope(plain, 415)["code"] == "unsupported_media_type"
    as_json = httpx.post(untouched.url + VARIATIONS, json={"n": 1}, timeout=60)
    assert assert_envelope(as_json, 415)["code"] == "unsupported_media_type"
    masked = httpx.post(untouched.url + VARIATIONS, files={"image": PNG_32, "mask": PNG_32}, timeout=60)
    assert "takes no mask" in assert_envelope(masked, 400, "mask")["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"mask_image": "abc"}, "mask_image", "send an image too"),
        ({"strength": 0.5}, "strength", "send an image too"),
        ({"image": data_url(PNG_32), "strength": 0}, "strength", "greater than 0"),
        ({"image": data_url(PNG_32), "strength": 1.01}, "strength", "less than or equal to 1"),
        ({"image": data_url(PNG_32), "width": 40}, "width", "multiple of 16"),
        ({"image": "%%%"}, "image", "not valid base64"),
        ({"mask_blur": 2}, "mask_blur", "send an image too"),
        ({"image": data_url(PNG_32), "mask_blur": 2}, "mask_blur", "send mask_image too"),
        ({"image": data_url(PNG_32), "mask_image": data_url(PNG_32), "mask_blur": -1}, "mask_blur", "between 0 and 64"),
    ],
    ids=[
        "mask-alone",
        "strength-alone",
        "strength-0",
        "strength-over-1",
        "width-40",
        "not-base64",
        "mask-blur-alone",
        "mask-blur-without-mask",
        "mask-blur-negative",
    ],
)
def test_bad_native_edit_fields_are_400(untouched: Any, body: dict[str, Any], param: str, words: str) -> None:
    for path in (NATIVE, "/api/jobs"):
        answer = httpx.post(untouched.url + path, json={"prompt": "a fox", **body}, timeout=60)
        assert words in assert_envelope(answer, 400, param)["message"]


def test_decoding_runs_off_the_event_loop(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """While an image decodes (held here until another request has been answered), the server answers others: a
    decode on the event loop would hold every other request until it ends, and this test would fail."""
    import api.images_in

    decoding, answered = threading.Event(), threading.Event()
    real = api.images_in.open_image

    def held(*args: Any, **kwargs: Any) -> Any:
        decoding.set()
        if not answered.wait(timeout=60):
            raise AssertionError("no other request was answered while an image was decoding")
        return real(*args, **kwargs)

    monkeypatch.setattr(api.images_in, "open_image", held)
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(answer=edit(server, PNG_32, size="32x32", **FAST)))
    worker.start()
    assert decoding.wait(timeout=60)
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    answered.set()
    worker.join(timeout=120)
    assert outcome["answer"].status_code == 200, outcome["answer"].text
