"""The server's idle-time release (api.loading.idle_release): when its engine falls idle, the heap's free pages go back
to the system. glibc keeps what a thread frees in that thread's arena, and the step engine's threads kept tens of MiB
more after every block of a soak (bench/soak_memory.py); a real server, real requests over HTTP, the process's RSS."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import LiveServer, wait_ready

MIB = 1 << 20
BLOCK = 64 * 1024  # below glibc's mmap threshold: served from an arena, as a request's tensors of that size are


def _glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return False
    return True


def _free_memory_the_allocator_keeps(total: int) -> list[bytes]:
    """``total`` bytes written in 64 KiB blocks in a thread of their own (its own arena, as a slot thread's), then
    all freed but every 16th block: nothing at the top of a heap is free, so glibc hands none of it back itself."""
    kept: list[bytes] = []

    def allocate() -> None:
        blocks = [b"x" * BLOCK for _ in range(total // BLOCK)]  # written: resident, not merely reserved
        kept.extend(blocks[15::16])

    thread = threading.Thread(target=allocate)
    thread.start()
    thread.join()
    return kept


def _several_models(tmp_path: Path) -> LiveServer:
    """A server of two of tests/model_dirs.py's models (api/several.py builds its engine)."""
    from model_dirs import save_family

    from serverasync import Settings, create_app

    family = save_family(tmp_path / "family")
    models = [f"{name}={family[name]}" for name in ("large", "medium")]
    live = LiveServer(create_app(Settings(model=models, data_dir=str(tmp_path), image_dir=str(tmp_path / "images"))))
    wait_ready(live.url)
    return live


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
@pytest.mark.parametrize("engine", ["threads", "step", "several models"])
def test_a_server_falling_idle_hands_the_heaps_free_pages_back(make_server, tmp_path: Path, engine: str) -> None:
    live = _several_models(tmp_path) if engine == "several models" else make_server(engine=engine)
    try:
        _trims_when_idle(live)
    finally:
        if engine == "several models":
            live.stop()


def _trims_when_idle(live: LiveServer) -> None:
    released = threading.Event()
    release = live.engine.release  # the server's own, run as it is; we only learn when it has run

    def observed() -> None:
        release()
        released.set()

    live.engine.release = observed
    kept = _free_memory_the_allocator_keeps(192 * MIB)
    process = psutil.Process()
    before = process.memory_info().rss
    body = {"prompt": "a lighthouse", "num_inference_steps": 1, "width": 32, "height": 32, "seed": 1}
    response = httpx.post(f"{live.url}/api/diffusers/inference", json=body, timeout=120, trust_env=False)
    assert response.status_code == 200, response.text
    assert released.wait(60), "the engine fell idle and released nothing"
    after = process.memory_info().rss
    # 180 MiB of the 192 were free; without the trim the RSS does not move (the request itself adds a little).
    assert before - after > 96 * MIB, (before // MIB, after // MIB)
    assert len(kept) == 192 * MIB // BLOCK // 16
