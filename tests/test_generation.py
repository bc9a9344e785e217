"""api/generation.py: the blank check, and no images saved for a client that left during the final decode."""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from http_helpers import NATIVE

from api.generation import is_blank


@pytest.mark.parametrize("text", ["", "  \t\n", "\u200b\u200c\u200d", "\ufeff\u2060\u200e", "\u00a0\u3000\u2028"])
def test_invisible_prompts_are_blank(text: str) -> None:
    assert is_blank(text)


@pytest.mark.parametrize("text", ["a", " fox ", "\u200bx", "猫", "🦊"])
def test_visible_prompts_are_not_blank(text: str) -> None:
    assert not is_blank(text)


def test_no_images_are_saved_for_a_client_that_left_during_the_final_decode(
    make_server: Callable[..., Any], tiny_pipeline: Any
) -> None:
    from diffusers import StableDiffusion3Pipeline

    decoding, release, armed = threading.Event(), threading.Event(), threading.Event()
    vae = copy.deepcopy(tiny_pipeline.vae)  # the session pipeline is never touched

    def hold(module: Any, args: Any) -> None:
        if not armed.is_set():  # the start-up memory measurement decodes once: not a request's decode
            return
        decoding.set()
        release.wait(60)  # bounded: a failing test cannot hang the server

    vae.decoder.register_forward_pre_hook(hold)
    pipe = StableDiffusion3Pipeline(**{**tiny_pipeline.components, "vae": vae})
    live = make_server(loader=lambda s: SimpleNamespace(pipeline=pipe, device=torch.device("cpu")))
    armed.set()
    try:
        body = b'{"prompt": "x", "num_inference_steps": 1}'
        sock = socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=10)
        sock.sendall(
            f"POST {NATIVE} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert decoding.wait(60), "the decode never started"
        sock.close()
        deadline = time.monotonic() + 30
        while live.engine.stats["disconnected"] < 1:
            assert time.monotonic() < deadline, "the server never saw the disconnect"
            time.sleep(0.05)
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while live.engine.active:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(live.app.state.store) == 0 and list(live.app.state.store.directory.glob("*.png")) == []
    assert httpx.get(f"{live.url}/health").status_code == 200
