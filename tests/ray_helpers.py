"""A real ``python deploy/ray_serve.py`` for tests/test_ray_serve.py: start, wait, look at its processes, stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import REPO, free_port

from deploy.ray_serve import EXIT_RAY_UNAVAILABLE

STARTUP_TIMEOUT = 240.0
KEEP_ALIVE_S = 3


def free_ports_in_a_row(count: int) -> list[int]:
    """``count`` consecutive loopback ports free now (bounded tries)."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(first, first + count))
    raise RuntimeError(f"no {count} free ports in a row")


class ServeProcess:
    """``python deploy/ray_serve.py`` with two replicas on a free loopback port."""

    def __init__(
        self,
        tmp: Path,
        max_queue: int,
        job_store: str | None = None,
        models: tuple[str, ...] = ("random:tiny",),
        extra: tuple[str, ...] = (),
    ) -> None:
        """``models``: each a ``--model`` value; ``extra``: more flags of the script or the server."""
        self.url = f"http://127.0.0.1:{free_port()}"
        self.metrics_ports = free_ports_in_a_row(2)  # replica i's own /metrics: the first + i
        self.log_path = tmp / "ray_serve.log"
        command = [
            sys.executable,
            str(REPO / "deploy" / "ray_serve.py"),
            *(flag for model in models for flag in ("--model", model)),
            *("--num-replicas", "2", "--num-cpus", "0.5", "--ray-cpus", "2"),
            *("--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--image-dir", str(tmp / "images")),
            *("--data-dir", str(tmp)),  # its own default job store, jobs.db there (unless --job-store)
            *("--max-queue", str(max_queue), "--default-steps", "2", "--shutdown-timeout", "10"),
            # Ray's proxy closes connections idle this long between requests (its keep_alive_timeout_s).
            *("--keep-alive-timeout", str(KEEP_ALIVE_S), "--metrics-port", str(self.metrics_ports[0])),
            *(("--job-store", job_store) if job_store else ()),  # every replica gets it
            *extra,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # Its own session: a fallback kill reaches Ray's processes even if the script dies first.
        self.proc = subprocess.Popen(
            command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self) -> None:
        """Until the script says it serves (Serve's deploy returned: both replicas loaded), or skip/fail."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "deploy.ray_serve: serving" not in self.log():
            if self.proc.poll() is not None:
                if self.proc.returncode == EXIT_RAY_UNAVAILABLE:
                    line = next((x for x in self.log().splitlines() if "ray could not start" in x), "")
                    pytest.skip(f"Ray cannot start on this machine: {line[-300:]}")
                pytest.fail(f"deploy/ray_serve.py exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not serving after {STARTUP_TIMEOUT:g}s:\n{self.log()[-3000:]}")
            time.sleep(0.5)
        assert httpx.get(f"{self.url}/ready", timeout=30).status_code == 200

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def replica_pids(self) -> list[int]:
        return [p.pid for p in self.descendants() if any("ServeReplica" in part for part in _cmdline(p))]

    def stop(self) -> None:
        """Fallback clean-up (the last test stops it properly): SIGTERM, then SIGKILL to all it started."""
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        for child in children:
            if alive(child):
                child.kill()
        self._log.close()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.name()}: {' '.join(process.cmdline())[:100]}"
    except psutil.Error:
        return f"{process.pid} (gone)"


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def metric(text: str, name: str, labels: str) -> float:
    found = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def native_200s(port: int) -> tuple[str, float]:
    """One scrape of a replica's own metrics port: the replica that answered, its native 200s so far."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert response.status_code == 200, response.text[:200]
    return response.headers["X-Replica"], metric(response.text, "sd_requests_total", 'api="native",status="200"')


def closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closed ``sock`` (EOF or reset), or None if still open after ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def raw_socket(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)
