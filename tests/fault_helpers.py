"""Store faults on real parts: a small tmpfs that fills up (SQLite's "database or disk is full"), a read-only bind
mount, and a real ``redis-server`` that refuses writes (``maxmemory`` reached, ``noeviction``).

Mounting needs root (CAP_SYS_ADMIN): without it the tests that need a mount are skipped, saying so. Every mount is
undone when its ``with`` ends, whatever the test did.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import free_port
from redis_helpers import REDIS_SERVER


def _mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind mount needs root")
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode}): needs CAP_SYS_ADMIN")


def _unmount(path: Path) -> None:
    # Lazy: a file some thread still holds open (a SQLite connection) must not leave the mount behind.
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (made here) for the ``with``."""
    path.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    except BaseException:
        path.rmdir()
        raise
    try:
        yield path
    finally:
        _unmount(path)


@contextlib.contextmanager
def read_only(source: Path, path: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``path`` (a bind mount) for the ``with``."""
    path.mkdir()
    try:
        _mount("--bind", "-o", "ro", str(source), str(path))
    except BaseException:
        path.rmdir()
        raise
    try:
        yield path
    finally:
        _unmount(path)


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system is full; delete the file to free the space."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):  # smaller and smaller: every last block taken
            chunk = b"\xff" * size
            while True:
                try:
                    if os.write(fd, chunk) < size:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def refusing_writes(port: int) -> Iterator[None]:
    """The ``redis-server`` on ``port`` past its ``maxmemory`` (1 byte, no eviction): every command that may add
    data is refused with ``OOM command not allowed when used memory > 'maxmemory'``; reads still work."""
    client = redis.Redis(port=port, socket_connect_timeout=2)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        yield
    finally:
        client.config_set("maxmemory", "0")
        client.close()


@contextlib.contextmanager
def a_replica(port: int) -> Iterator[None]:
    """The ``redis-server`` on ``port`` made a replica of a master that is not there: it keeps its data and answers
    reads, and refuses writes with ``READONLY``."""
    client = redis.Redis(port=port, socket_connect_timeout=2)
    client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    try:
        yield
    finally:
        client.execute_command("REPLICAOF", "NO", "ONE")
        client.close()


@contextlib.contextmanager
def redis_saving_to(directory: Path) -> Iterator[redis.Redis]:
    """A ``redis-server`` that saves RDB snapshots in ``directory`` (no AOF), for as long as the ``with`` lasts."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    with open(directory.parent / f"redis-{port}.log", "ab") as log:
        proc = subprocess.Popen([*command, "--save", "3600 1", "--appendonly", "no"], stdout=log, stderr=log)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        deadline = time.monotonic() + 30
        while not _answers(client):
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def _answers(client: redis.Redis) -> bool:
    with contextlib.suppress(redis.ConnectionError):
        return bool(client.ping())
    return False


def saved(client: redis.Redis) -> bool:
    """Run a snapshot (``BGSAVE``) to its end; whether it was written. After one that was not, a Redis with
    ``stop-writes-on-bgsave-error yes`` (its default) refuses writes with ``MISCONF`` until one is."""
    client.bgsave()
    deadline = time.monotonic() + 30
    while (info := client.info("persistence"))["rdb_bgsave_in_progress"]:
        assert time.monotonic() < deadline, "BGSAVE never ended"
        time.sleep(0.05)
    return info["rdb_last_bgsave_status"] == "ok"
