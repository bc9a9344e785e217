"""Overload, faults and hostile input against a real server on loopback (random:tiny): nothing lost, nothing leaked.

Faults happen for real: a private copy of the tiny transformer is wrapped with a forward pre-hook that counts the
denoising steps actually run (and which request ran them, by latent width), and can hold a step on a gate, slow
it down or raise. Everything else is the real server: uvicorn, sockets, threads, signals, files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from utils.image_store import IMAGE_NAME, ImageStore

NATIVE = "/api/diffusers/inference"
OPENAI = "/v1/images/generations"
# Latent width of a request's images (pixels / VAE factor 8): tells which request a denoising step belonged to.
SIZE_A, SIZE_B = 32, 48
WIDTH_A, WIDTH_B = SIZE_A // 8, SIZE_B // 8
MARKER = "HOSTILE-MARKER-7f3a"  # put in bad input; must never come back in an answer
LEAK_SIGNS = ("Traceback", 'File "', ".py", "/etc", "/work", "/tmp", "Error:")


# ---------------------------------------------------------------------------------------------------------
# Fault-injecting model and helpers
# ---------------------------------------------------------------------------------------------------------


class FaultyTransformer:
    """A private copy of the tiny transformer whose forward calls (one per denoising step) can be observed and
    held, slowed down or made to fail. Armed once the server is ready: the start-up measurement's pass (memory
    admission) and the step engine's calibration are not a request's steps."""

    def __init__(self, pipeline: Any) -> None:
        self.module = copy.deepcopy(pipeline.transformer)  # the session pipeline is never touched
        self.module.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.delay = 0.0
        self.gate = threading.Event()  # a step waits here while it is clear
        self.gate.set()
        self.errors: list[BaseException] = []  # raised by the next forward calls, in order
        self.on_forward: Callable[[], None] | None = None
        self.started = threading.Event()
        self._lock = threading.Lock()  # protects widths and errors: every generation thread touches them
        self.widths: list[int] = []
        self.armed = False

    def _before_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.armed:
            return
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with self._lock:
            self.widths.append(int(latents.shape[-1]))
            error = self.errors.pop(0) if self.errors else None
        self.started.set()
        if self.on_forward is not None:
            self.on_forward()
        if error is not None:
            raise error
        # Bounded, so that a failing test can't hang the server forever.
        self.gate.wait(60)
        if self.delay:
            time.sleep(self.delay)

    def steps(self, width: int | None = None) -> int:
        """Denoising steps run so far (of requests with this latent width, when given)."""
        with self._lock:
            return sum(1 for w in self.widths if width is None or w == width)


@pytest.fixture
def faulty(make_server: Callable[..., Any], tiny_pipeline: Any) -> Iterator[Callable[..., tuple[Any, Any]]]:
    """Factory: faulty(**settings) -> (live server, FaultyTransformer) serving a pipeline with the faulty copy."""
    from diffusers import StableDiffusion3Pipeline

    made: list[FaultyTransformer] = []

    def make(**settings: Any) -> tuple[Any, FaultyTransformer]:
        fault = FaultyTransformer(tiny_pipeline)
        pipe = StableDiffusion3Pipeline(**{**tiny_pipeline.components, "transformer": fault.module})
        made.append(fault)
        live = make_server(loader=lambda s: SimpleNamespace(pipeline=pipe, device=torch.device("cpu")), **settings)
        fault.armed = True
        return live, fault

    yield make
    for fault in made:  # let held steps go, so the servers can stop
        fault.gate.set()


def body(steps: int = 1, size: int = SIZE_A, **extra: Any) -> dict[str, Any]:
    return {"prompt": "a red fox", "num_inference_steps": steps, "height": size, "width": size, "seed": 1, **extra}


def post(url: str, json_body: Any, path: str = NATIVE, **kwargs: Any) -> httpx.Response:
    return httpx.post(url + path, json=json_body, timeout=120, **kwargs)


def status(live: Any) -> dict[str, Any]:
    return httpx.get(live.url + "/api/status", timeout=30).json()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for a state (never a speed): fail with ``what`` if it doesn't come within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.02)


def counters(live: Any) -> tuple[int, int]:
    state = status(live)
    return state["active_inferences"], state["queued"]


def assert_idle(live: Any) -> None:
    """Counters back to 0, and every request admitted to the engine accounted for by exactly one outcome."""
    wait_until(lambda: counters(live) == (0, 0), "active_inferences == queued == 0")
    stats = status(live)["requests"]
    outcomes = ("completed", "rejected", "timed_out", "disconnected", "cancelled", "failed", "out_of_memory")
    assert stats["total"] == sum(stats[k] for k in outcomes), json.dumps(stats)


def envelope(response: httpx.Response, status_code: int) -> dict[str, Any]:
    """Check the error envelope, that it leaks nothing, and return its error object."""
    assert response.status_code == status_code, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and 0 < len(error["message"]) <= 300, error
    for sign in (*LEAK_SIGNS, MARKER):
        assert sign not in response.text, (sign, response.text)
    return error


def raw_send(url: str, request: bytes) -> socket.socket:
    """Open a TCP connection to the server and write ``request`` as is (no client-side normalisation)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    sock.sendall(request)
    return sock


def raw_post(url: str, path: str, payload: dict[str, Any]) -> socket.socket:
    data = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return raw_send(url, head.encode() + data)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (the server closes or gives Content-Length) and close the socket."""
    data = b""
    with sock:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", -1))
        while length < 0 or len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(lines[0].split()[1]), headers, rest


def raw_get(url: str, target: str) -> tuple[int, dict[str, str], bytes]:
    request = f"GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode("latin-1")
    return read_response(raw_send(url, request))


def png_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if IMAGE_NAME.match(p.name))


# ---------------------------------------------------------------------------------------------------------
# 1. Admission and 9. accurate counters
# ---------------------------------------------------------------------------------------------------------


def test_default_concurrency_is_two_slots_sharing_the_cores(make_server: Callable[..., Any]) -> None:
    from api.loading import default_concurrency, usable_cores

    live = make_server()
    # The tiny model runs on the CPU here: two slots (one on a single core), splitting the cores between them.
    assert status(live)["max_concurrency"] == min(2, usable_cores())
    assert live.engine.cpu_threads == usable_cores()
    assert default_concurrency("cuda") == 2 and default_concurrency("mps") == 2


def test_beyond_slots_and_queue_the_answer_is_an_immediate_503_with_no_work(faulty: Any) -> None:
    live, fault = faulty(max_concurrency=1, max_queue=2)
    fault.gate.clear()
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, live.url, body(steps=2))
        wait_until(lambda: fault.started.is_set(), "the first request is denoising")
        queued = [pool.submit(post, live.url, body(steps=2)) for _ in range(2)]
        wait_until(lambda: counters(live) == (1, 2), "one running, two waiting")

        # Slots and queue full: answered while the others are still held, and the model never sees it.
        overflow = post(live.url, body(steps=2, size=SIZE_B))
        error = envelope(overflow, 503)
        assert error["type"] == "overloaded_error" and error["code"] == "queue_full"
        assert int(overflow.headers["retry-after"]) >= 1
        assert not running.done() and counters(live) == (1, 2)
        openai_overflow = post(live.url, {"prompt": "x", "size": "48x48", "num_inference_steps": 2}, OPENAI)
        assert envelope(openai_overflow, 503)["type"] == "overloaded_error"

        fault.gate.set()
        for future in (running, *queued):
            assert future.result().status_code == 200
    assert fault.steps(WIDTH_B) == 0
    assert status(live)["requests"]["rejected"] == 2
    assert_idle(live)


def test_status_counts_running_and_waiting_requests_exactly(faulty: Any) -> None:
    live, fault = faulty(max_concurrency=2, max_queue=3)
    fault.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for expected in ((1, 0), (2, 0), (2, 1), (2, 2)):
            futures.append(pool.submit(post, live.url, body(steps=3)))
            wait_until(lambda e=expected: counters(live) == e, f"(active, queued) == {expected}")
        # A waiting client leaves: it no longer counts as queued; the running ones still do.
        leaver = raw_post(live.url, NATIVE, body(steps=3))
        wait_until(lambda: counters(live) == (2, 3), "(2, 3) with the leaver queued")
        leaver.close()
        wait_until(lambda: counters(live) == (2, 2), "(2, 2) after the leaver went")
        fault.gate.set()
        assert [f.result().status_code for f in futures] == [200] * 4
    assert_idle(live)
    assert status(live)["requests"]["completed"] == 4


# ---------------------------------------------------------------------------------------------------------
# 2. Request timeout
# ---------------------------------------------------------------------------------------------------------


def test_timeout_answers_504_stops_at_the_next_step_and_frees_the_slot(faulty: Any) -> None:
    live, fault = faulty(max_concurrency=1, max_queue=0, request_timeout=0.5)
    fault.gate.clear()  # the first step is held past the deadline
    answer = post(live.url, body(steps=50))
    error = envelope(answer, 504)
    assert error["type"] == "timeout_error"
    # The slot counts until the worker thread has really stopped; the held step is still running.
    assert counters(live) == (1, 0)
    fault.gate.set()
    wait_until(lambda: counters(live) == (0, 0), "the slot is freed")
    time.sleep(0.3)
    assert fault.steps() == 1, "the generation went on past the step that was running at the deadline"
    # The slot is really free: with no queue, a busy slot would answer 503.
    assert post(live.url, body(steps=2)).status_code == 200
    assert status(live)["requests"]["timed_out"] == 1
    assert_idle(live)


# ---------------------------------------------------------------------------------------------------------
# 3. Client disconnect
# ---------------------------------------------------------------------------------------------------------


def test_client_gone_mid_generation_stops_at_the_next_step(faulty: Any) -> None:
    live, fault = faulty(max_concurrency=1, max_queue=0)
    fault.gate.clear()
    sock = raw_post(live.url, NATIVE, body(steps=50))
    wait_until(fault.started.is_set, "the request is denoising")
    sock.close()
    wait_until(lambda: status(live)["requests"]["disconnected"] == 1, "the server saw the disconnect")
    fault.gate.set()
    wait_until(lambda: counters(live) == (0, 0), "the slot is freed")
    time.sleep(0.3)
    assert fault.steps() == 1, "the generation went on after its client left"
    assert post(live.url, body(steps=2)).status_code == 200
    assert_idle(live)


def test_client_gone_while_queued_never_runs(faulty: Any) -> None:
    live, fault = faulty(max_concurrency=1, max_queue=4)
    fault.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, live.url, body(steps=3))
        wait_until(fault.started.is_set, "the first request is denoising")
        sock = raw_post(live.url, NATIVE, body(steps=3, size=SIZE_B))
        wait_until(lambda: counters(live) == (1, 1), "the second request is queued")
        sock.close()
        wait_until(lambda: counters(live) == (1, 0), "the abandoned request left the queue")
        fault.gate.set()
        assert running.result().status_code == 200
    assert_idle(live)
    assert fault.steps(WIDTH_B) == 0, "an abandoned queued request ran"
    assert status(live)["requests"]["disconnected"] == 1
    assert len(png_names(live.app.state.store.directory)) == 1


# ---------------------------------------------------------------------------------------------------------
# 4. Health, readiness and drain on SIGTERM
# ---------------------------------------------------------------------------------------------------------


def test_health_is_alive_and_readiness_503_while_loading(make_server: Callable[..., Any], tiny_pipeline: Any) -> None:
    release = threading.Event()

    def slow_loader(settings: Any) -> Any:
        release.wait(60)
        return SimpleNamespace(pipeline=tiny_pipeline, device=torch.device("cpu"))

    live = make_server(loader=slow_loader, wait=False)
    try:
        assert httpx.get(live.url + "/health").status_code == 200
        not_ready = httpx.get(live.url + "/ready")
        assert envelope(not_ready, 503)["code"] == "loading" and "retry-after" in not_ready.headers
        early = post(live.url, body())
        assert envelope(early, 503)["type"] == "unavailable" and "retry-after" in early.headers
        assert httpx.get(live.url + "/api/status").json()["ready"] is False
    finally:
        release.set()
    wait_until(lambda: httpx.get(live.url + "/ready").status_code == 200, "ready once loaded")
    assert post(live.url, body()).status_code == 200  # loaded: generation works
    live.engine.start_draining()  # what SIGTERM does first (tested for real below)
    draining = httpx.get(live.url + "/ready")
    assert envelope(draining, 503)["code"] == "draining"
    assert envelope(post(live.url, body()), 503)["code"] == "draining"
    assert httpx.get(live.url + "/health").status_code == 200


def _start_long_request(proc: Any, pool: ThreadPoolExecutor, steps: int, size: int) -> Future[httpx.Response]:
    """Send a long request to a server process and return once it is generating."""
    future = pool.submit(post, proc.url, body(steps=steps, size=size))

    def generating() -> bool:
        try:
            return httpx.get(proc.url + "/api/status", timeout=5).json()["active_inferences"] == 1
        except httpx.HTTPError:
            return False

    wait_until(generating, "the long request is generating", timeout=60)
    return future


def _refused_or_503(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 503
    except httpx.TransportError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["threads", "step"])
def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(spawn_server: Callable[..., Any], engine: str) -> None:
    proc = spawn_server("--shutdown-timeout", "120", "--max-steps", "1000", "--engine", engine).wait_ready()
    with ThreadPoolExecutor(1) as pool:
        # ~5 s of denoising here: long enough to be mid-generation when the signal lands.
        in_flight = _start_long_request(proc, pool, steps=250, size=256)
        proc.proc.send_signal(signal.SIGTERM)
        assert not in_flight.done(), "the request finished before the signal; make it longer"
        wait_until(lambda: _refused_or_503(proc.url), "new requests refused or 503 while draining")
        answer = in_flight.result(timeout=120)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["response"]) == 1
    assert proc.proc.wait(timeout=120) == 0
    assert "draining" in proc.log() and "Traceback" not in proc.log()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["threads", "step"])
def test_sigterm_with_a_short_shutdown_timeout_still_exits(spawn_server: Callable[..., Any], engine: str) -> None:
    proc = spawn_server("--shutdown-timeout", "0.5", "--max-steps", "1000", "--engine", engine).wait_ready()
    with ThreadPoolExecutor(1) as pool:
        # Minutes of denoising: far past the shutdown timeout.
        in_flight = _start_long_request(proc, pool, steps=1000, size=512)
        proc.proc.send_signal(signal.SIGTERM)
        # Bounded: at the timeout the generation is stopped at its next step instead of being waited for.
        assert proc.proc.wait(timeout=60) == 0
        answer = in_flight.result(timeout=60)
    # The cut-off request still gets a proper answer, not a dropped connection or a bare 500.
    assert envelope(answer, 503)["code"] == "draining" and "retry-after" in answer.headers
    assert "drain ended: stopping 1 running" in proc.log()
    assert "Traceback" not in proc.log(), "an orderly, if cut short, drain logs no error"


# ---------------------------------------------------------------------------------------------------------
# 5. Failures: out of memory and unexpected errors
# ---------------------------------------------------------------------------------------------------------


def test_out_of_memory_is_503_frees_caches_and_the_next_request_works(faulty: Any) -> None:
    live, fault = faulty(max_concurrency=1)
    released_with_slot_held: list[int] = []
    live.engine.release = lambda: released_with_slot_held.append(live.engine.active)
    fault.errors = [
        MemoryError("cannot allocate 9 GiB in /work/secret/alloc.py"),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (/work/secret/cuda.py)"),
    ]
    for path, payload in ((NATIVE, body(steps=2)), (OPENAI, {"prompt": "x", "size": "32x32", "n": 1})):
        answer = post(live.url, payload, path)
        error = envelope(answer, 503)
        assert error["type"] == "out_of_memory" and "retry-after" in answer.headers
        assert "secret" not in answer.text and "GiB" not in answer.text
    # Caches were freed on the failure itself, with the failed request's slot still held (idle releases see 0).
    assert [n for n in released_with_slot_held if n > 0] == [1, 1]
    recovered = post(live.url, body(steps=2))
    assert recovered.status_code == 200 and httpx.get(recovered.json()["response"][0]).status_code == 200
    assert status(live)["requests"]["out_of_memory"] == 2
    assert_idle(live)


def test_unexpected_error_is_500_with_request_id_details_only_in_the_log(
    faulty: Any, caplog: pytest.LogCaptureFixture
) -> None:
    live, fault = faulty()
    fault.errors = [RuntimeError("secret-detail at /etc/secret-path/model.py line 3")]
    with caplog.at_level(logging.ERROR):
        answer = post(live.url, body(steps=2), headers={"X-Request-ID": "hardening-500"})
    error = envelope(answer, 500)
    assert error["type"] == "server_error"
    assert "hardening-500" in error["message"] and answer.headers["x-request-id"] == "hardening-500"
    assert "secret" not in answer.text
    assert "secret-detail" in caplog.text and "hardening-500" in caplog.text
    assert post(live.url, body(steps=2)).status_code == 200
    assert status(live)["requests"]["failed"] == 1
    assert_idle(live)


# ---------------------------------------------------------------------------------------------------------
# 6. Files: only generated names, no traversal, no symlinks, atomic writes, retention
# ---------------------------------------------------------------------------------------------------------


def test_images_serves_only_generated_names(make_server: Callable[..., Any], tmp_path: Path) -> None:
    live = make_server()
    image_dir = live.app.state.store.directory
    url = post(live.url, body(steps=1)).json()["response"][0]
    name = url.rsplit("/", 1)[1]
    assert httpx.get(url).status_code == 200

    # Targets a naive join would reach: a file beside the image directory and the server's own source.
    secret = image_dir.parent / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    link = image_dir / ("ab" * 16 + ".png")
    link.symlink_to(secret)
    inner_link = image_dir / ("cd" * 16 + ".png")
    inner_link.symlink_to(image_dir / name)  # even a link to a real image is refused
    (image_dir / ("ef" * 16 + ".png")).mkdir()
    (image_dir / ".tmp-half-written.png").write_bytes(b"\x89PNG partial")

    targets = [
        "/images/..%2Fsecret.txt",
        "/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e%2fsecret.txt",
        "/images/%2e%2e/secret.txt",
        "/images/../secret.txt",
        "/images/..%5csecret.txt",
        "/images/%252e%252e%252fsecret.txt",
        "/images/x%00.png",
        f"/images/{name}%00.txt",
        f"/images/{name[:-4]}%00.png",
        f"/images/{name}/..%2F..%2Fsecret.txt",
        "/images/%2Fetc%2Fpasswd",
        "/images//etc/passwd",
        f"/images/{link.name}",
        f"/images/{inner_link.name}",
        f"/images/{'ef' * 16}.png",
        "/images/.tmp-half-written.png",
        f"/images/{name.upper()}",
    ]
    for target in targets:
        code, headers, content = raw_get(live.url, target)
        assert code == 404, (target, code)
        assert b"TOP-SECRET" not in content and b"root:" not in content and b"PNG" not in content, target
        assert json.loads(content)["error"]["type"] == "not_found_error", target
    assert raw_get(live.url, f"/images/{name}")[0] == 200  # the real one still works


def test_image_store_writes_are_atomic(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    payloads = [b"\x89PNG\r\n\x1a\n" + os.urandom(1 << 20) for _ in range(24)]
    digests = {hashlib.sha256(p).digest() for p in payloads}
    torn: list[str] = []
    done = threading.Event()

    def reader() -> None:
        # Whatever a reader can see under a servable name is a whole file, never a half-written one.
        while not done.is_set():
            for name in png_names(store.directory):
                opened = store.open_image(name)
                if opened is None:
                    continue
                with opened[0] as handle:
                    data = handle.read()
                if hashlib.sha256(data).digest() not in digests:
                    torn.append(name)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        names = [store.save_png(p) for p in payloads]
    finally:
        done.set()
        watcher.join()
    assert torn == []
    assert png_names(store.directory) == sorted(names)
    assert [p.name for p in store.directory.iterdir() if p.name.startswith(".tmp-")] == []
    with pytest.raises(TypeError):
        store.save_png("not bytes")  # type: ignore[arg-type]  # a failed write leaves no partial file behind
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(names)


def test_image_store_retention_by_age_count_and_bytes(tmp_path: Path) -> None:
    aged = ImageStore(tmp_path / "ttl", ttl_seconds=60)
    old = [aged.save_png(b"x" * 100) for _ in range(3)]
    assert aged.prune(now=time.time() + 30) == 0
    assert aged.prune(now=time.time() + 61) == 3
    assert png_names(aged.directory) == [] and len(aged) == 0 and all(aged.open_image(n) is None for n in old)

    counted = ImageStore(tmp_path / "count", max_files=3)
    counted_names = [counted.save_png(b"x" * 100) for _ in range(5)]
    assert png_names(counted.directory) == sorted(counted_names[2:])

    sized = ImageStore(tmp_path / "bytes", max_bytes=2500)
    names = [sized.save_png(b"x" * 1000) for _ in range(4)]
    assert png_names(sized.directory) == sorted(names[2:]) and sized.total_bytes == 2000

    # A restarted server finds what is on disk and applies its (new) limits to it, oldest by mtime first (set
    # apart here: files written within one clock tick share an mtime).
    for age, name in enumerate(reversed(counted_names[2:])):
        os.utime(counted.directory / name, (time.time() - 10 * age, time.time() - 10 * age))
    restarted = ImageStore(tmp_path / "count", max_files=1)
    assert len(restarted) == 3 and restarted.prune() == 2
    assert png_names(restarted.directory) == [counted_names[4]]  # the newest stays
    opened = restarted.open_image(counted_names[4])
    assert opened is not None and opened[1] == 100
    opened[0].close()


def test_image_store_removes_stale_temp_files_on_start(tmp_path: Path) -> None:
    # A process killed mid-write leaves a temp file; the next start removes it once it is old, never a fresh one
    # (another server sharing the directory may be writing it right now).
    directory = tmp_path / "images"
    directory.mkdir()
    stale, fresh = directory / ".tmp-crashed.png", directory / ".tmp-writing.png"
    stale.write_bytes(b"half a png")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    store = ImageStore(directory)
    assert not stale.exists() and fresh.exists()
    assert len(store) == 0


def test_server_retention_keeps_the_disk_bounded(make_server: Callable[..., Any]) -> None:
    capped = make_server(image_max_files=2, max_images_per_request=2, image_grace=10)
    urls = [post(capped.url, body(steps=1)).json()["response"][0] for _ in range(4)]
    # Within the grace period every URL handed out is still there, beyond the cap.
    assert [httpx.get(u).status_code for u in urls] == [200, 200, 200, 200]
    assert capped.app.state.store.prune(now=time.time() + 11) == 2  # past the grace period, the cap holds
    assert len(png_names(capped.app.state.store.directory)) == 2
    assert [httpx.get(u).status_code for u in urls] == [404, 404, 200, 200]

    expiring = make_server(image_ttl=1, image_grace=1)
    url = post(expiring.url, body(steps=1)).json()["response"][0]
    # The periodic pruning deletes it with nobody asking.
    wait_until(lambda: not png_names(expiring.app.state.store.directory), "the expired image is deleted")
    assert httpx.get(url).status_code == 404


# ---------------------------------------------------------------------------------------------------------
# Hostile bodies
# ---------------------------------------------------------------------------------------------------------

JSON = "application/json"
HOSTILE_BODIES: list[tuple[str, str, bytes, str | None]] = [
    ("malformed JSON", NATIVE, b'{"prompt": "x", ', JSON),
    ("not JSON", NATIVE, MARKER.encode(), JSON),
    ("invalid UTF-8", NATIVE, b'{"prompt": "\xff\xfe"}', JSON),
    ("lone surrogate", NATIVE, b'{"prompt": "\\ud800"}', JSON),
    ("empty body", NATIVE, b"", JSON),
    ("JSON array", NATIVE, b'["a fox"]', JSON),
    ("JSON string", NATIVE, json.dumps(MARKER).encode(), JSON),
    ("JSON null", NATIVE, b"null", JSON),
    ("deep nesting", NATIVE, b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON),
    ("deep objects", NATIVE, b'{"a":' * 5_000 + b"1" + b"}" * 5_000, JSON),
    ("prompt is a number", NATIVE, b'{"prompt": 123}', JSON),
    ("prompt is a list", NATIVE, json.dumps({"prompt": [MARKER]}).encode(), JSON),
    ("prompt is null", NATIVE, b'{"prompt": null}', JSON),
    ("steps is text", NATIVE, json.dumps({"prompt": "x", "num_inference_steps": MARKER}).encode(), JSON),
    ("steps is fractional", NATIVE, b'{"prompt": "x", "num_inference_steps": 1.5}', JSON),
    ("height is a dict", NATIVE, b'{"prompt": "x", "height": {"a": 1}}', JSON),
    ("unknown long field", NATIVE, json.dumps({"prompt": "x", "k" * 30_000: 1}).encode(), JSON),
    ("missing prompt", NATIVE, b'{"num_inference_steps": 2}', JSON),
    ("blank prompt", NATIVE, b'{"prompt": " \\t\\n "}', JSON),
    ("empty prompt", NATIVE, b'{"prompt": ""}', JSON),
    ("zero-width prompt", NATIVE, json.dumps({"prompt": "\u200b\u200c\u200d\ufeff\u2060\u00a0"}).encode(), JSON),
    ("zero-width openai prompt", OPENAI, json.dumps({"prompt": "\u200b\u200e\u2028"}).encode(), JSON),
    ("prompt too long", NATIVE, json.dumps({"prompt": "y" * 2001}).encode(), JSON),
    ("negative prompt too long", NATIVE, json.dumps({"prompt": "x", "negative_prompt": "y" * 2001}).encode(), JSON),
    ("steps 0", NATIVE, b'{"prompt": "x", "num_inference_steps": 0}', JSON),
    ("steps above max", NATIVE, b'{"prompt": "x", "num_inference_steps": 5}', JSON),
    ("steps huge", NATIVE, b'{"prompt": "x", "num_inference_steps": 1000000000000}', JSON),
    ("height not a multiple", NATIVE, b'{"prompt": "x", "height": 17}', JSON),
    ("height negative", NATIVE, b'{"prompt": "x", "height": -16}', JSON),
    ("width above max", NATIVE, b'{"prompt": "x", "width": 4096}', JSON),
    ("images 0", NATIVE, b'{"prompt": "x", "num_images_per_prompt": 0}', JSON),
    ("images above max", NATIVE, b'{"prompt": "x", "num_images_per_prompt": 3}', JSON),
    ("seed negative", NATIVE, b'{"prompt": "x", "seed": -1}', JSON),
    ("seed huge", NATIVE, b'{"prompt": "x", "seed": ' + b"9" * 400 + b"}", JSON),
    ("guidance NaN", NATIVE, b'{"prompt": "x", "guidance_scale": NaN}', JSON),
    ("guidance Infinity", NATIVE, b'{"prompt": "x", "guidance_scale": Infinity}', JSON),
    ("guidance negative", NATIVE, b'{"prompt": "x", "guidance_scale": -1}', JSON),
    ("text/plain", NATIVE, b'{"prompt": "x"}', "text/plain"),
    ("form", NATIVE, b"prompt=x", "application/x-www-form-urlencoded"),
    (
        "multipart",
        NATIVE,
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
    ),
    ("no content type", NATIVE, b'{"prompt": "x"}', None),
    ("size not WxH", OPENAI, json.dumps({"prompt": "x", "size": MARKER[:16]}).encode(), JSON),
    ("size too small", OPENAI, b'{"prompt": "x", "size": "0x0"}', JSON),
    ("size too big", OPENAI, b'{"prompt": "x", "size": "99999x99999"}', JSON),
    ("size not a multiple", OPENAI, b'{"prompt": "x", "size": "16x17"}', JSON),
    ("size overlong", OPENAI, json.dumps({"prompt": "x", "size": "1" * 100}).encode(), JSON),
    ("n too big", OPENAI, b'{"prompt": "x", "n": 11}', JSON),
    ("bad response_format", OPENAI, json.dumps({"prompt": "x", "response_format": MARKER}).encode(), JSON),
    ("quality overlong", OPENAI, json.dumps({"prompt": "x", "quality": "q" * 1000}).encode(), JSON),
    ("openai wrong types", OPENAI, b'{"prompt": "x", "n": "two", "seed": "s"}', JSON),
]


def test_hostile_bodies_get_a_4xx_envelope_and_do_no_work(make_server: Callable[..., Any]) -> None:
    live = make_server(max_steps=4, default_steps=2, max_image_size=256, max_images_per_request=2)
    with httpx.Client(base_url=live.url, timeout=30) as client:
        for name, path, content, content_type in HOSTILE_BODIES:
            headers = {"Content-Type": content_type} if content_type else {}
            answer = client.post(path, content=content, headers=headers)
            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
            envelope(answer, answer.status_code)
            assert len(answer.content) < 1000, (name, "the answer echoes unbounded input")
    assert status(live)["requests"]["total"] == 0, "a hostile body reached the engine"
    assert png_names(live.app.state.store.directory) == []


def _read_answer_while_sending(sock: socket.socket, chunks: Iterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Send ``chunks`` until the server answers (it must, before the body ends), then read the answer."""
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
    return read_response(sock)


def test_huge_bodies_get_413_declared_or_streamed(make_server: Callable[..., Any]) -> None:
    live = make_server()
    ten_mb = 10 * 1024 * 1024
    piece = b"x" * 65536
    # The native route takes images, so its limit is --max-upload-bytes (20 MiB): twice that is refused at once.
    declared = 2 * live.app.state.settings.max_upload_bytes
    head = f"POST {NATIVE} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    sock = raw_send(live.url, head.encode())
    code, _, content = _read_answer_while_sending(sock, iter([piece] * (ten_mb // len(piece))))
    assert code == 413 and json.loads(content)["error"]["type"] == "invalid_request_error"

    # Chunked, no Content-Length: the limit is enforced on the bytes as they stream in.
    head = f"POST {OPENAI} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock = raw_send(live.url, head.encode())
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    code, _, content = _read_answer_while_sending(sock, iter([chunk] * (ten_mb // len(piece))))
    assert code == 413 and json.loads(content)["error"]["message"]
    assert status(live)["requests"]["total"] == 0


# ---------------------------------------------------------------------------------------------------------
# 7. Memory clean-up never stalls a running request
# ---------------------------------------------------------------------------------------------------------


def test_memory_release_never_overlaps_a_generation(faulty: Any) -> None:
    live, fault = faulty(max_concurrency=2, max_queue=16)
    lock = threading.Lock()  # protects the records below: worker threads write them
    releasing = threading.Event()
    active_at_release: list[int] = []
    overlaps: list[float] = []

    def slow_release() -> None:
        with lock:
            active_at_release.append(live.engine.active)
        releasing.set()
        time.sleep(0.3)  # a release long enough for new requests to arrive during it
        releasing.clear()

    def step_started() -> None:
        if releasing.is_set():
            with lock:
                overlaps.append(time.monotonic())

    live.engine.release = slow_release
    fault.on_forward = step_started
    fault.delay = 0.01
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert post(live.url, body(steps=3)).status_code == 200
            # The server is idle now, so a release starts; these arrive while it runs, and overlap each other.
            wait_until(releasing.is_set, "an idle-time release started")
            wave = [pool.submit(post, live.url, body(steps=3)) for _ in range(3)]
            assert [f.result().status_code for f in wave] == [200] * 3
            wait_until(lambda: not releasing.is_set(), "the release finished")
    assert active_at_release and set(active_at_release) == {0}
    assert overlaps == [], "a denoising step ran during a memory release"
    assert_idle(live)


# ---------------------------------------------------------------------------------------------------------
# 8. Access: CORS and the API key
# ---------------------------------------------------------------------------------------------------------


def _preflight(url: str, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    return httpx.options(url + NATIVE, headers=headers)


def test_cors_default_is_closed_star_has_no_credentials_and_a_list_is_exact(make_server: Callable[..., Any]) -> None:
    evil, good = "https://evil.example", "https://good.example"

    closed = make_server()
    for answer in (httpx.get(closed.url + "/health", headers={"Origin": evil}), _preflight(closed.url, evil)):
        assert "access-control-allow-origin" not in answer.headers

    anyone = make_server(cors_origins="*")
    for answer in (httpx.get(anyone.url + "/health", headers={"Origin": evil}), _preflight(anyone.url, evil)):
        assert answer.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in answer.headers

    listed = make_server(cors_origins=f"{good}, https://other.example")
    answer = httpx.get(listed.url + "/health", headers={"Origin": good})
    assert answer.headers["access-control-allow-origin"] == good
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert _preflight(listed.url, good).headers["access-control-allow-origin"] == good
    assert "access-control-allow-origin" not in httpx.get(listed.url + "/health", headers={"Origin": evil}).headers
    assert "access-control-allow-origin" not in _preflight(listed.url, evil).headers


def test_api_key_guards_generation_and_works_with_the_openai_client(make_server: Callable[..., Any]) -> None:
    import openai

    key = "sekrit-key-123"
    live = make_server(api_key=key)
    native, images = body(steps=1), {"prompt": "x", "size": "32x32", "num_inference_steps": 1}
    for path, payload in ((NATIVE, native), (OPENAI, images)):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {key}"},
            {"Authorization": key},
        ):
            answer = post(live.url, payload, path, headers=headers)
            assert envelope(answer, 401)["type"] == "authentication_error"
            assert answer.headers["www-authenticate"] == "Bearer" and key not in answer.text
        assert post(live.url, payload, path, headers={"Authorization": f"Bearer {key}"}).status_code == 200

    client = openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0)
    result = client.images.generate(
        prompt="a fox",
        size="32x32",
        response_format="url",
        extra_body={"num_inference_steps": 1},  # type: ignore[arg-type]
    )
    assert result.data and result.data[0].url
    # Probes and the images themselves stay open; status needs the key (tests/test_middleware.py).
    for path in ("/health", "/ready", urlsplit(result.data[0].url).path):
        assert httpx.get(live.url + path).status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
