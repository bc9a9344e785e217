"""The connection guard (api/protocol.py) against a real server subprocess on loopback: hostile clients are bounded
in header size, time and number, answered in the envelope, and never stall anyone else."""

from __future__ import annotations

import json
import re
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

HEALTH_DEADLINE_S = 1.0


def connect(server: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def read_all(sock: socket.socket, limit_s: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (bounded in time)."""
    sock.settimeout(limit_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def envelope_of(raw: bytes, status: int) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == str(status).encode(), head
    assert b"content-type: application/json" in head.lower()
    return json.loads(body)["error"]


def test_a_huge_header_is_431_and_health_stays_fast_beside_2000_idle_connections(
    spawn_server: Callable[..., Any],
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    # 2,000 where the open-file limit allows it (this process holds one end of each, the server the other).
    idle_count = min(2000, hard - 300)
    assert idle_count >= 500, f"the open-file limit ({hard}) is too low for this test"
    if soft < idle_count + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (idle_count + 200, hard))
    server = spawn_server("--keep-alive-timeout", "120").wait_ready()
    idle = [connect(server) for _ in range(idle_count)]
    answer: dict[str, bytes] = {}

    def send_huge_header() -> None:
        sock = connect(server)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: ")
            for _ in range(64):  # 64 MB in 1 MB pieces, until the server answers and closes
                sock.sendall(b"a" * (1 << 20))
        except OSError:
            pass
        answer["raw"] = read_all(sock)
        sock.close()

    sender = threading.Thread(target=send_huge_header)
    sender.start()
    slowest = 0.0
    with httpx.Client(timeout=10) as client:
        while sender.is_alive():
            started = time.monotonic()
            assert client.get(f"{server.url}/health").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    sender.join(timeout=60)
    assert slowest < HEALTH_DEADLINE_S, f"/health took {slowest:.2f}s"
    error = envelope_of(answer["raw"], 431)
    assert error["code"] == "too_large" and "32768 bytes" in error["message"]
    # The idle ones are still open (their keep-alive is 120 s) and a request on one of them is served.
    idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert read_all(idle[0]).startswith(b"HTTP/1.1 200")
    for sock in idle:
        sock.close()


def head_of(size: int, path: str = "/health") -> bytes:
    """A complete GET head of exactly ``size`` bytes (its blank line included)."""
    start = f"GET {path} HTTP/1.1\r\nHost: a\r\nX-Pad: ".encode()
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_the_header_limit_holds_for_a_head_that_arrives_whole_in_one_read(spawn_server: Callable[..., Any]) -> None:
    # h11 measures only heads still arriving: these arrive whole, in one send each (far below one read's size).
    server = spawn_server("--max-header-bytes", "1024").wait_ready()
    for size, status in ((1024, 200), (1025, 431), (4096, 431), (60_000, 431)):
        sock = connect(server)
        sock.sendall(head_of(size))
        raw = read_all(sock, limit_s=10) if status == 431 else sock.recv(65536)
        assert raw.startswith(f"HTTP/1.1 {status} ".encode()), (size, raw[:200])
        if status == 431:
            error = envelope_of(raw, 431)
            assert error["code"] == "too_large" and "1024 bytes" in error["message"]
        sock.close()
    # Pipelined behind a request that is served: the oversized head is refused when its turn comes.
    sock = connect(server)
    sock.sendall(head_of(200) + head_of(2000))
    raw = read_all(sock, limit_s=10)
    first, _, second = raw.partition(b"HTTP/1.1 431 ")
    assert first.startswith(b"HTTP/1.1 200 ") and second, raw[:500]
    sock.close()
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_idle_and_trickling_clients_are_timed_out_with_408(spawn_server: Callable[..., Any]) -> None:
    server = spawn_server("--keep-alive-timeout", "1", "--receive-timeout", "2").wait_ready()
    silent = connect(server)
    head_trickle = connect(server)
    body_trickle = connect(server)
    started = time.monotonic()
    head_trickle.sendall(b"GET /health HTTP/1.1\r\nHo")
    body_trickle.sendall(
        b"POST /api/diffusers/inference HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"pro'
    )
    for _ in range(10):  # keeps trickling: each byte must not push the deadline back
        time.sleep(0.1)
        head_trickle.sendall(b"s")
    assert read_all(silent) == b""
    for sock in (head_trickle, body_trickle):
        assert envelope_of(read_all(sock), 408)["type"] == "timeout_error"
    assert time.monotonic() - started < 20
    log = server.log()
    assert "--keep-alive-timeout: closed" in log and "--receive-timeout: answered 408" in log
    assert httpx.get(f"{server.url}/health").status_code == 200


def reported(log: str, what: str) -> int:
    """The sum of the counts the guard's lines for ``what`` reported."""
    return sum(int(n) for n in re.findall(re.escape(what) + r"[^\n(]*\((\d+) since the last report\)", log))


@pytest.mark.slow
def test_a_burst_of_refusals_is_logged_whole(spawn_server: Callable[..., Any]) -> None:
    server = spawn_server("--keep-alive-timeout", "1", "--max-connections", "40").wait_ready()
    idle, over_cap = "sent nothing within --keep-alive-timeout: closed", "too many open connections"
    burst = [connect(server) for _ in range(50)]  # 40 served (then idle), 10 beyond the cap (silent, closed)
    for sock in burst:
        assert read_all(sock, limit_s=10) == b""  # closed by the server
        sock.close()
    # One line at once, the rest of the burst when the guard's period (5 s) ends: the counts add up to the burst.
    deadline = time.monotonic() + 15
    while (reported(server.log(), idle), reported(server.log(), over_cap)) != (50, 10):
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.2)
    assert len(re.findall(re.escape(idle), server.log())) <= 3  # and still only a few lines


def test_malformed_request_is_400_in_the_envelope(spawn_server: Callable[..., Any]) -> None:
    server = spawn_server().wait_ready()
    sock = connect(server)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    assert envelope_of(read_all(sock), 400)["code"] == "bad_request"


def test_connections_beyond_the_cap_get_a_503_envelope_and_are_logged(spawn_server: Callable[..., Any]) -> None:
    server = spawn_server("--max-connections", "5", "--keep-alive-timeout", "60").wait_ready()
    held = [connect(server) for _ in range(5)]
    time.sleep(0.5)  # the server has accepted them all
    refused = httpx.get(f"{server.url}/health", timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
    assert refused.headers["retry-after"] == "1"
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the cap was not freed by closed connections"
        time.sleep(0.1)
    assert "too many open connections: answered 503" in server.log()


@pytest.mark.slow
def test_a_client_that_does_not_read_is_disconnected_after_the_send_timeout(spawn_server: Callable[..., Any]) -> None:
    server = spawn_server("--send-timeout", "1").wait_ready()
    body = json.dumps(
        {"prompt": "noise", "n": 2, "size": "1024x1024", "response_format": "b64_json", "num_inference_steps": 1}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answer piles up at the server
    sock.settimeout(120)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.monotonic() + 120
    while "--send-timeout: connection closed" not in server.log():
        assert time.monotonic() < deadline, "the non-reading client was never disconnected"
        time.sleep(0.2)
    raw = read_all(sock)
    head, _, payload = raw.partition(b"\r\n\r\n")
    declared = int(
        next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
    )
    assert len(payload) < declared  # cut off: the server let go of the rest
    assert httpx.get(f"{server.url}/health").status_code == 200
