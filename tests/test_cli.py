"""``python serverasync.py``: its options, its validation before any model loads, and a real end-to-end run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from http_helpers import NATIVE, fetch_png, open_png

from serverasync import Settings

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "Pipelines", "utils", "fastapi.testclient")


def run_server_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "serverasync.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=False)


def test_help_lists_every_option() -> None:
    result = run_server_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in result.stdout, f"{flag} missing from --help"
    assert "SERVER_" in result.stdout  # says every flag is also an environment variable


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-queue", "-1"], "--max-queue: Input should be greater than or equal to 0"),
        (["--port", "http"], "--port: Input should be a valid integer"),
        (["--port", "70000"], "--port: Input should be less than or equal to 65535"),
        (["--max-concurrency", "0"], "--max-concurrency: Input should be greater than or equal to 1"),
        (["--public-url", "img.example.com"], "--public-url: public_url must start with http:// or https://"),
        (["--type-models", "img2img"], "--type-models: type_models must be 't2im'"),
        (["--log-level", "loud"], "--log-level: log_level must be debug, info, warning or error"),
        (["--default-steps", "200"], "default_steps (200) is above max_steps (100)"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--engine", "turbo"], "--engine: engine must be 'threads' or 'step'"),
        (["--engine", "threads", "--compile"], "compile needs --engine step"),
        (["--max-batch-size", "0"], "--max-batch-size: Input should be greater than or equal to 1"),
        (["--prompt-cache-size", "-1"], "--prompt-cache-size: Input should be greater than or equal to 0"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_invalid_option_exits_2_before_loading_a_model(args: list[str], words: str) -> None:
    # A model path that does not exist: had the server got as far as loading, the error would be about it.
    result = run_server_cli("--model", "/nonexistent/model", *args)
    assert result.returncode == 2
    assert f"serverasync.py: error: {words}" in result.stderr, result.stderr
    assert "nonexistent" not in result.stderr and "Traceback" not in result.stderr
    assert "None:" not in result.stderr


def test_invalid_environment_variable_exits_2() -> None:
    result = run_server_cli("--model", "/nonexistent/model", env={**os.environ, "SERVER_MAX_QUEUE": "-3"})
    assert result.returncode == 2
    assert "--max-queue: Input should be greater than or equal to 0" in result.stderr


def test_validation_happens_before_anything_heavy_is_imported() -> None:
    code = (
        "import sys, serverasync\n"
        "rc = serverasync.main(['--model', 'random:tiny', '--max-queue', '-1'])\n"
        f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.split() == ["2", "[]"], result.stdout + result.stderr


def test_importing_serverasync_loads_nothing_heavy() -> None:
    code = f"import sys, json, serverasync\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def raw_http10_post(host: str, port: int, body: dict[str, Any]) -> dict[str, Any]:
    """POST with HTTP/1.0 and no Host header at all, over a bare socket; the JSON answer."""
    data = json.dumps(body).encode()
    head = f"POST {NATIVE} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(head.encode() + data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    status_line, _, rest = b"".join(chunks).partition(b"\r\n")
    assert b" 200 " in status_line, status_line
    return json.loads(rest.partition(b"\r\n\r\n")[2])


def test_cli_server_serves_end_to_end_with_client_facing_urls(spawn_server: Callable[..., Any]) -> None:
    # Bound to every interface: the links must still name an address the client can reach, never 0.0.0.0.
    server = spawn_server("--host", "0.0.0.0", "--default-steps", "2", "--max-concurrency", "2")
    server.wait_ready()
    response = httpx.post(server.url + NATIVE, json={"prompt": "a lighthouse", "seed": 3}, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["parameters"]["num_inference_steps"] == 2
    [url] = answer["response"]
    assert url.startswith(server.url + "/images/")
    assert open_png(fetch_png(url)).size == (64, 64)

    status = httpx.get(server.url + "/api/status").json()
    assert (status["current_model"], status["device"], status["max_concurrency"]) == ("random:tiny", "cpu", 2)

    no_host = raw_http10_post("127.0.0.1", server.port, {"prompt": "a lighthouse", "seed": 3})
    [url] = no_host["response"]
    assert urlparse(url).hostname == "127.0.0.1", url  # the address the client connected to
    assert open_png(fetch_png(url)).size == (64, 64)
