"""output_format and output_compression (OpenAI's names) on both APIs, and the image store keeping each format:
real server, real clients (httpx and the openai package), images decoded with Pillow."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from http_helpers import NATIVE, OPENAI, assert_envelope
from PIL import Image

from api.settings import max_image_bytes
from utils.image_store import DEFAULT_COMPRESSION, IMAGE_NAME, MEDIA_TYPES, Encoding, ImageStore

# format -> (Pillow's name for it, media type, file extension)
FORMATS = {
    "png": ("PNG", "image/png", "png"),
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "webp": ("WEBP", "image/webp", "webp"),
}
BODY = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 5}


def decode(data: bytes, fmt: str) -> Image.Image:
    """Decode ``data``, checking that it is an image in ``fmt``."""
    image = Image.open(io.BytesIO(data))
    assert image.format == FORMATS[fmt][0], (image.format, fmt)
    image.load()
    return image


def fetch(url: str, fmt: str) -> bytes:
    """GET a stored image, checking it is served with the media type of its format."""
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == FORMATS[fmt][1]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert int(response.headers["content-length"]) == len(response.content)
    return response.content


def native(url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(url + NATIVE, json={**BODY, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def server(make_server: Callable[..., Any]) -> Any:
    return make_server()


def test_native_answers_stores_and_serves_every_format(server: Any) -> None:
    for fmt, (_, _, extension) in FORMATS.items():
        answer = native(server.url, output_format=fmt, width=64, height=32, num_images_per_prompt=2)
        assert answer["parameters"]["output_format"] == fmt
        assert answer["parameters"]["output_compression"] == DEFAULT_COMPRESSION
        for url in answer["response"]:
            name = url.rsplit("/", 1)[1]
            assert IMAGE_NAME.match(name) and name.endswith("." + extension), name
            assert decode(fetch(url, fmt), fmt).size == (64, 32)
    default = native(server.url)
    assert default["parameters"]["output_format"] == "png" and default["response"][0].endswith(".png")


def test_openai_client_sends_output_format_natively_and_reads_format_and_size(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    for fmt in FORMATS:
        result = client.images.generate(
            prompt="a lighthouse",
            size="64x32",  # type: ignore[arg-type]  # any WxH multiple of 16 works here
            output_format=fmt,  # type: ignore[arg-type]
            output_compression=20,
            response_format="b64_json",
            extra_body={"num_inference_steps": 2},
        )
        assert result.output_format == fmt and result.size == "64x32"
        [item] = result.data or []
        assert decode(base64.b64decode(item.b64_json or ""), fmt).size == (64, 32)
        as_url = client.images.generate(
            prompt="a lighthouse",
            output_format=fmt,  # type: ignore[arg-type]
            response_format="url",
            extra_body={"num_inference_steps": 2},
        )
        [item] = as_url.data or []
        assert item.url is not None and item.url.endswith("." + FORMATS[fmt][2])
        assert decode(fetch(item.url, fmt), fmt).size == (64, 64)  # the tiny model's native size


def test_compression_trades_size_for_quality_and_png_stays_lossless(server: Any) -> None:
    def stored(fmt: str, compression: int | None) -> bytes:
        extra = {} if compression is None else {"output_compression": compression}
        [url] = native(server.url, output_format=fmt, width=128, height=128, **extra)["response"]
        return fetch(url, fmt)

    for fmt in ("jpeg", "webp"):
        sizes = {c: len(stored(fmt, c)) for c in (0, 50, 95)}
        assert sizes[0] > sizes[50] > sizes[95], (fmt, sizes)  # higher compression, smaller file (OpenAI's meaning)
        assert stored(fmt, None) == stored(fmt, DEFAULT_COMPRESSION)  # the default is the documented one
    lossless = [stored("png", c) for c in (0, 100)]
    assert len(lossless[0]) > len(lossless[1])  # level 0 only stores
    assert decode(lossless[0], "png").tobytes() == decode(lossless[1], "png").tobytes()  # same pixels
    jpeg = decode(stored("jpeg", 0), "jpeg").convert("RGB").tobytes()
    assert jpeg != decode(lossless[0], "png").convert("RGB").tobytes()  # JPEG is lossy, even at 0


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("output_format", "gif"),
        ("output_format", "jpg"),
        ("output_format", "PNG"),
        ("output_format", 1),
        ("output_compression", 101),
        ("output_compression", -1),
        ("output_compression", "50"),
        ("output_compression", 50.5),
        ("output_compression", True),
    ],
)
def test_bad_format_or_compression_is_a_400_envelope_on_both_apis(server: Any, field: str, bad: Any) -> None:
    for path in (NATIVE, OPENAI):
        response = httpx.post(server.url + path, json={**BODY, field: bad}, timeout=60)
        error = assert_envelope(response, 400, field)
        assert error["code"] == "invalid_value" and error["message"].startswith(field)
    with pytest.raises(openai.BadRequestError) as caught:
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).images.generate(
            prompt="a fox",
            extra_body={field: bad},  # the client's types would refuse some of these before sending
        )
    assert caught.value.param == field


def test_the_store_serves_only_its_own_names_in_the_three_formats(server: Any) -> None:
    directory = server.app.state.store.directory
    hex_name = "ab" * 16
    for extension in ("gif", "jpeg", "JPG", "png.txt", "svg", "jpg\n"):
        (directory / f"{hex_name}.{extension}").write_bytes(b"GIF89a planted")
        assert_envelope(httpx.get(f"{server.url}/images/{hex_name}.{extension.replace(chr(10), '%0A')}"), 404)
    for name, matches in (
        (f"{hex_name}.png", True),
        (f"{hex_name}.jpg", True),
        (f"{hex_name}.webp", True),
        (f"{hex_name}.jpeg", False),
        (f"{hex_name}.PNG", False),
        (f"{hex_name}.webp.png", False),
        (f"{hex_name[:-1]}.jpg", False),
        (f"{hex_name}.jpg\n", False),
    ):
        assert bool(IMAGE_NAME.match(name)) is matches, name
    assert set(MEDIA_TYPES) == {extension for _, _, extension in FORMATS.values()}
    # The OpenAPI document lists the media types /images answers with.
    schema = httpx.get(server.url + "/openapi.json").json()
    content = schema["paths"]["/images/{filename}"]["get"]["responses"]["200"]["content"]
    assert set(content) == set(MEDIA_TYPES.values())


def test_retention_and_restart_cover_every_format(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", max_files=2)
    names = [store.save(b"x" * 10, extension) for extension in ("png", "jpg", "webp")]
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(names[1:])  # the oldest went, whatever format
    restarted = ImageStore(tmp_path / "images", max_files=2)
    assert len(restarted) == 2 and restarted.total_bytes == 20
    with pytest.raises(ValueError, match="extension"):
        store.save(b"x", "gif")
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(names[1:])  # nothing written for it


def test_encoding_bounds_and_the_retention_byte_bound_holds_for_every_format() -> None:
    for bad in (("gif", 10), ("jpeg", 101), ("png", -1)):
        with pytest.raises(ValueError):
            Encoding(*bad)
    # Noise is the worst case for every encoder; --image-max-bytes is checked against this bound at start-up.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in FORMATS:
        for compression in (0, 100):
            encoded = Encoding(fmt, compression).encode(noise)
            assert len(encoded) <= max_image_bytes(64), (fmt, compression)
            assert decode(encoded, fmt).size == (64, 64)
