"""Helpers shared by the HTTP tests: decoding PNGs and checking the error envelope."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENVELOPE_FIELDS = {"message", "type", "param", "code"}
NATIVE = "/api/diffusers/inference"
OPENAI = "/v1/images/generations"


def open_png(data: bytes) -> Image.Image:
    """Decode PNG bytes (checking the signature) into a loaded PIL image."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def pixels(data: bytes) -> tuple[tuple[int, int], bytes]:
    """The decoded size and RGB pixel bytes of a PNG: compare images by these, never by the PNG bytes."""
    image = open_png(data).convert("RGB")
    return image.size, image.tobytes()


def fetch_png(url: str, client: httpx.Client | None = None) -> bytes:
    """GET an image URL and return its bytes, checking status and content type."""
    response = (client or httpx).get(url, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return response.content


def openai_images(answer: dict[str, Any], client: httpx.Client | None = None) -> list[bytes]:
    """The PNG bytes of every image in an OpenAI Images answer, whichever response_format it used."""
    images = []
    for item in answer["data"]:
        if "b64_json" in item:
            assert "url" not in item
            images.append(base64.b64decode(item["b64_json"], validate=True))
        else:
            images.append(fetch_png(item["url"], client))
    return images


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """Check ``response`` is ``status`` with the error envelope (and ``param``, when given); return its error."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not None:
        assert error["param"] == param, error
    return error
