"""What a client can see and do without the key, against a real server subprocess: no file system path anywhere,
401 before the body is read, HEAD wherever GET works."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from http_helpers import NATIVE, OPENAI

from api.middleware import is_public

KEY = "sesame-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_a_local_model_path_is_never_shown_and_the_key_guards_all_but_the_public_paths(
    spawn_server: Callable[..., Any], tiny_pipeline: Any, tmp_path: Path
) -> None:
    model_dir = tmp_path / "private-models" / "my-sd3"
    tiny_pipeline.save_pretrained(model_dir)
    server = spawn_server("--model", str(model_dir), env={"SERVER_API_KEY": KEY}).wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answers = {path: client.get(path, headers=AUTH) for path in ("/", "/ready", "/api/status", "/v1/models")}
        for path, answer in answers.items():
            assert answer.status_code == 200, path
            assert str(tmp_path) not in answer.text and "private-models" not in answer.text, path
        assert answers["/"].json()["model"] == "my-sd3"
        assert answers["/api/status"].json()["current_model"] == "my-sd3"
        assert answers["/v1/models"].json()["data"][0]["id"] == "my-sd3"

        image = client.post(NATIVE, json={"prompt": "x", "num_inference_steps": 1}, headers=AUTH).json()["response"][0]
        for path in ("/", "/health", "/ready", "/docs", "/openapi.json", httpx.URL(image).path):
            assert client.get(path).status_code == 200, path
        # The docs page's own script and CSS, served locally, load without the key too (a browser sends none).
        assets = re.findall(r'(?:src|href)="(/docs/static/[^"]+)"', client.get("/docs").text)
        assert len(assets) >= 2, assets
        for path in assets:
            assert client.get(path).status_code == 200, path
        for path in ("/api/status", "/v1/models", "/no/such/route"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error", path
        for path in (NATIVE, OPENAI):
            assert client.post(path, json={"prompt": "x"}).status_code == 401


def test_a_request_without_the_key_is_refused_before_its_body_arrives(spawn_server: Callable[..., Any]) -> None:
    server = spawn_server("--api-key", KEY).wait_ready()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # Declares a body it never sends: only a server that does not wait for it can answer.
        head = f"POST {NATIVE} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n"
        sock.sendall(head.encode() + b"\r\n")
        started = time.monotonic()
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 401"), head[:100]
    assert time.monotonic() - started < 5


def test_head_answers_wherever_get_does(spawn_server: Callable[..., Any]) -> None:
    server = spawn_server().wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        image = client.post(NATIVE, json={"prompt": "x", "num_inference_steps": 1}).json()["response"][0]
        for path in ("/health", "/ready", httpx.URL(image).path):
            got, head = client.get(path), client.head(path)
            assert head.status_code == 200 and head.content == b"", path
            assert head.headers["content-length"] == got.headers["content-length"], path
        assert client.head(NATIVE).status_code == 405  # a POST-only route stays POST-only


def test_public_paths_are_exactly_the_documented_ones() -> None:
    public = ("/", "/health", "/ready", "/docs", "/openapi.json", "/images/a.png", "/docs/static/swagger-ui.css")
    assert all(is_public(p) for p in (*public, "/ui", "/ui/static/ui.js"))
    guarded = ("/api/status", "/v1/models", NATIVE, OPENAI, "/imagesx", "/metrics", "/ui/x", "/uix", "/api/jobs")
    assert not any(is_public(p) for p in guarded)
