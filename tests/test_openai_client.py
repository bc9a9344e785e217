"""The official ``openai`` client against the server's OpenAI Images API (real uvicorn on loopback)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import openai
import pytest
from http_helpers import ENVELOPE_FIELDS, fetch_png, open_png, pixels

FAST = {"num_inference_steps": 2}  # our extension, sent through the client's extra_body


@pytest.fixture
def server(make_server: Callable[..., Any]) -> Any:
    return make_server()


def client_for(server: Any, api_key: str = "x") -> openai.OpenAI:
    """An OpenAI client pointed at the live server, failing fast (no retries)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def test_b64_json_images(server: Any) -> None:
    result = client_for(server).images.generate(
        prompt="a lighthouse at dusk",
        model="dall-e-3",
        n=2,
        size="96x48",  # type: ignore[arg-type]  # any WxH multiple of 16 works here
        response_format="b64_json",
        quality="hd",
        style="natural",
        user="user-1",
        extra_body={**FAST, "seed": 11},
    )
    assert result.created > 0
    assert len(result.data) == 2
    decoded = [pixels(base64.b64decode(item.b64_json or "")) for item in result.data]
    assert [size for size, _ in decoded] == [(96, 48), (96, 48)]
    assert decoded[0][1] != decoded[1][1]
    assert all(item.url is None for item in result.data)


def test_url_images_download(server: Any) -> None:
    client = client_for(server)
    result = client.images.generate(prompt="a lighthouse", response_format="url", extra_body={**FAST, "seed": 11})
    [item] = result.data
    assert item.url is not None and item.url.startswith(server.url + "/images/")
    assert item.b64_json is None
    image = fetch_png(item.url)
    assert open_png(image).size == (64, 64)  # the tiny model's native size when none is asked for

    again = client.images.generate(
        prompt="a lighthouse", response_format="b64_json", size="64x64", extra_body={**FAST, "seed": 11}
    )
    assert pixels(base64.b64decode(again.data[0].b64_json or "")) == pixels(image)  # same seed, same image


def test_models_list(server: Any) -> None:
    assert [model.id for model in client_for(server).models.list()] == ["random:tiny"]


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"n": 11}, "n", "between 1 and 10"),
        ({"size": "100x100"}, "size", "multiple of 16; try 96 or 112"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps", "between 1 and 100"),
    ],
    ids=["n=11", "size-100x100", "size-word", "steps-0"],
)
def test_bad_requests_raise_bad_request_error_with_our_envelope(
    server: Any, kwargs: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).images.generate(prompt="a lighthouse", **{"extra_body": FAST, **kwargs})
    error = caught.value
    assert error.status_code == 400
    assert isinstance(error.body, dict) and set(error.body) == ENVELOPE_FIELDS  # the client unwraps {"error": ...}
    assert error.body["param"] == param == error.param
    assert error.body["type"] == "invalid_request_error" == error.type
    assert error.code == "invalid_value"
    assert words in error.body["message"] and words in str(error)
    assert error.response.headers.get("x-request-id")


def test_wrong_api_key_raises_authentication_error(make_server: Callable[..., Any]) -> None:
    server = make_server(api_key="sesame")
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, api_key="wrong").images.generate(prompt="a lighthouse", extra_body=FAST)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    result = client_for(server, api_key="sesame").images.generate(
        prompt="a lighthouse", response_format="b64_json", extra_body=FAST
    )
    open_png(base64.b64decode(result.data[0].b64_json or ""))
