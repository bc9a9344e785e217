"""A real ``redis-server`` (Debian's package) for the job-store tests, and servers started on a port of our choice.

Redis runs with its append-only file fsynced at every write, in a directory of the test's, so a Redis stopped and
started again (the outage tests) comes back with every job it had stored.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from conftest import ServerProcess, free_port

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)


class RedisProcess:
    """``redis-server`` on a free loopback port; ``stop()`` and ``start()`` again keep its port and its data."""

    def __init__(self, directory: Path) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> RedisProcess:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"]
        self._log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                pass
            assert self.proc.poll() is None, (self.directory / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self._log.close()
        self.proc = None


class Server(ServerProcess):
    """``python serverasync.py`` (tests/conftest.py's), optionally on a given port: a server restarted on its port
    answers the URLs it handed out before."""

    def __init__(self, tmp: Path, *args: str, port: int | None = None) -> None:
        super().__init__(*args, *(("--port", str(port)) if port else ()), tmp_path=tmp)
        if port:
            self.port, self.url = port, f"http://127.0.0.1:{port}"
