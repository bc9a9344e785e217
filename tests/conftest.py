"""Shared fixtures. Nothing here reaches a model hub: the pipelines are random-weight ones built locally."""

from __future__ import annotations

import os

# Set before diffusers/transformers are imported anywhere: a test must never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The torch thread count this test process started with (see _torch_threads_as_started).
STARTING_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_as_started() -> None:
    """Every test starts with the process's starting torch thread count. ``torch.set_num_threads`` in any thread (an
    engine's slot or loop thread, a calibration) also sets MKL's count for the whole process, and MKL's results change
    with it: a test that left it at 1 made the next one's main-thread reference images differ from images made in
    new threads (a failure that depended on which test ran before, seen under pytest-xdist)."""
    torch.set_num_threads(STARTING_THREADS)


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The `random:tiny` pipeline, built once per test run. Tests must not mutate it."""
    from Pipelines import TextToImagePipelineSD3

    return TextToImagePipelineSD3("random:tiny", device="cpu").start().pipeline


# ---------------------------------------------------------------------------------------------------------
# Live servers on loopback: in-process uvicorn (fast; lets a test inject a fault into the loader) and
# subprocesses (for the CLI, signals and test.py).
# ---------------------------------------------------------------------------------------------------------

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _unclaimed_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The data directory (``SERVER_DATA_DIR``) of any server a test starts without one of its own: never the
    working directory (the repository), where the default job store would make ``jobs.db``. The fixtures below give
    each server its own, so that no two share a store by accident."""
    path = tmp_path_factory.mktemp("unclaimed-data")
    previous = os.environ.get("SERVER_DATA_DIR")
    os.environ["SERVER_DATA_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SERVER_DATA_DIR", None)
    else:
        os.environ["SERVER_DATA_DIR"] = previous


def wait_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll GET /ready until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


class LiveServer:
    """A real uvicorn serving `create_app(settings)` on 127.0.0.1, in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def engine(self) -> Any:
        return self.app.state.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def tiny_loader(pipeline: Any) -> Callable[[Any], Any]:
    """A loader handing the app an already built pipeline (the session's tiny one)."""
    import torch

    return lambda settings: SimpleNamespace(pipeline=pipeline, device=torch.device("cpu"))


@pytest.fixture
def make_server(tiny_pipeline, tmp_path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: make_server(loader=None, **settings) -> a ready LiveServer serving the tiny pipeline."""
    from serverasync import Settings, create_app

    servers: list[LiveServer] = []

    def make(loader: Callable[[Any], Any] | None = None, wait: bool = True, **overrides: Any) -> LiveServer:
        data = tmp_path / f"data{len(servers)}"  # its own job store (the default: data/jobs.db)
        data.mkdir(exist_ok=True)
        options = {"model": "random:tiny", "image_dir": str(tmp_path / f"images{len(servers)}"), "data_dir": str(data)}
        options.update(overrides)
        if options.get("engine") == "step":
            # Two loops, as the calibration picks on a two-core machine, without its sweep of loop counts (about
            # 2.5 s of CPU per server, and the suite starts dozens). Tests of the automatic choice pass step_loops=0.
            options.setdefault("step_loops", min(2, os.cpu_count() or 1))
        app = create_app(Settings(**options), loader=loader or tiny_loader(tiny_pipeline))
        live = LiveServer(app)
        servers.append(live)
        if wait:
            wait_ready(live.url)
        return live

    yield make
    for live in servers:
        live.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python serverasync.py ...` in a subprocess on a free loopback port."""

    def __init__(self, *args: str, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        command = [sys.executable, str(REPO / "serverasync.py"), "--host", "127.0.0.1", "--port", str(self.port)]
        if "--model" not in args:
            command += ["--model", "random:tiny"]
        if "--image-dir" not in args:
            command += ["--image-dir", str(tmp_path / "images")]
        if "--data-dir" not in args:  # its own job store (the default: DATA_DIR/jobs.db)
            data = tmp_path / f"data-{self.port}"
            data.mkdir()
            command += ["--data-dir", str(data)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        wait_ready(self.url, timeout, self.proc)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def spawn_server(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: spawn_server(*cli_args) -> a started (not yet ready) ServerProcess; killed at teardown."""
    procs: list[ServerProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        proc = ServerProcess(*args, tmp_path=tmp_path, env=env)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        proc.stop()
