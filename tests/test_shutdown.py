"""Shutdown of a real ``python serverasync.py`` process: every open request is answered in the JSON envelope.

A second Ctrl-C ends the drain at once (503 ``draining`` for everyone, one console line, no traceback); a client
that is still sending its body when ``--shutdown-timeout`` ends gets the same 503 envelope, not a plain-text 500.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from http_helpers import NATIVE


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def in_flight(url: str) -> int:
    try:
        status = httpx.get(url + "/api/status", timeout=5).json()
    except httpx.HTTPError:
        return -1
    return status["active_inferences"] + status["queued"]


def long_post(url: str) -> httpx.Response:
    # Minutes of denoising on the tiny model: far longer than the test waits.
    body = {"prompt": "a lighthouse", "num_inference_steps": 1000, "width": 512, "height": 512}
    return httpx.post(url + NATIVE, json=body, timeout=120)


def assert_draining_envelope(status: int, content_type: str, text: str) -> None:
    assert status == 503, text[:300]
    assert content_type.startswith("application/json"), content_type
    assert json.loads(text)["error"]["code"] == "draining", text[:300]


def test_second_ctrl_c_answers_every_request_503_and_logs_one_line(spawn_server: Callable[..., Any]) -> None:
    requests = 6
    proc = spawn_server("--max-concurrency", "1", "--max-steps", "1000", "--shutdown-timeout", "300").wait_ready()
    with ThreadPoolExecutor(requests) as pool:
        futures = [pool.submit(long_post, proc.url) for _ in range(requests)]
        wait_until(lambda: in_flight(proc.url) == requests, "every request is running or queued")
        proc.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "draining" in proc.log(), "the first Ctrl-C started the drain")
        proc.proc.send_signal(signal.SIGINT)
        answers = [future.result(timeout=120) for future in futures]
    for answer in answers:
        assert_draining_envelope(answer.status_code, answer.headers["content-type"], answer.text)
    assert proc.proc.wait(timeout=120) == 0
    log = proc.log()
    assert "second interrupt" in log, log[-3000:]
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]


def test_third_ctrl_c_quits_at_once_with_one_line(spawn_server: Callable[..., Any]) -> None:
    proc = spawn_server("--max-steps", "1000", "--shutdown-timeout", "300").wait_ready()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(long_post, proc.url)
        wait_until(lambda: in_flight(proc.url) == 1, "the request is running")
        for _ in range(3):  # as fast as impatient fingers: the second and third land while the drain is ending
            proc.proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        assert proc.proc.wait(timeout=60) == 130
        # Answered (503 draining) or cut off; either way the client is not left hanging.
        with contextlib.suppress(httpx.HTTPError):
            future.result(timeout=120)
    log = proc.log()
    assert "third interrupt: quitting now" in log, log[-3000:]
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]


def test_client_still_sending_at_the_shutdown_timeout_gets_503_envelope(spawn_server: Callable[..., Any]) -> None:
    proc = spawn_server("--shutdown-timeout", "1").wait_ready()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=60) as sock:
        # Headers promise 100 bytes of body; only a few ever come.
        head = f"POST {NATIVE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head.encode() + b'{"prompt": ')
        time.sleep(0.5)  # let the server start reading the body
        proc.proc.send_signal(signal.SIGTERM)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head_bytes, _, text = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert_draining_envelope(int(lines[0].split()[1]), headers.get("content-type", ""), text.decode())
    assert proc.proc.wait(timeout=60) == 0
    log = proc.log()
    assert "timeout graceful shutdown exceeded" not in log and "Traceback" not in log, log[-3000:]


def test_third_ctrl_c_while_a_generation_thread_outlives_the_server_quits_with_one_line(
    spawn_server: Callable[..., Any],
) -> None:
    # One denoising step of this request takes seconds: its thread stops only at the step's end, so the process
    # is still waiting for it after the server itself has stopped (the drain gave up on it after 2 x 1 s).
    proc = spawn_server("--shutdown-timeout", "1").wait_ready()
    body = {
        "prompt": "a lighthouse",
        "num_inference_steps": 2,
        "width": 1024,
        "height": 1024,
        "num_images_per_prompt": 8,
    }
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, proc.url + NATIVE, json=body, timeout=120)
        wait_until(lambda: in_flight(proc.url) == 1, "the request is running")
        proc.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "draining" in proc.log(), "the first Ctrl-C started the drain")
        proc.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "still running were abandoned" in proc.log(), "the server stopped without the thread")
        time.sleep(0.5)
        assert proc.proc.poll() is None, "the generation thread ended first: nothing left to interrupt"
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(timeout=5) == 130
        with contextlib.suppress(httpx.HTTPError):
            future.result(timeout=60)
    log = proc.log()
    assert log.count("third interrupt: quitting now") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
