"""The arms: plain pipeline calls in this process (``SerialArm``) and a server subprocess over HTTP
(``ServerArm``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from .common import REPO, log
from .options import apply_options, sdpa_backend_context
from .stats import PeakRSS, Run, Sample

ARMS = ("serial", "serial-opt", "thread", "ours", "threads", "step", "step-compile")


class Arm(Protocol):
    name: str
    idle: dict[str, int | None]

    def start(self) -> None: ...

    def run(self, offsets: list[float], seeds: list[int]) -> Run: ...

    def stop(self) -> None: ...


class SerialArm:
    """Plain pipeline calls in this process, one after another, first come first served."""

    def __init__(self, name: str, args: argparse.Namespace, with_options: bool = False) -> None:
        self.name = name
        self.args = args
        self.with_options = with_options
        self.pipe: Any = None
        self.device: Any = None
        self.idle: dict[str, int | None] = {}
        self.applied: list[str] = []
        self._context = contextlib.ExitStack()

    def start(self) -> None:
        import torch

        from Pipelines import TextToImagePipelineSD3

        log(f"{self.name}: loading {self.args.model}")
        loader = TextToImagePipelineSD3(self.args.model, device=self.args.device, dtype=self.args.dtype).start()
        self.pipe, self.device = loader.pipeline, loader.device
        if self.with_options:
            self.applied = apply_options(self.pipe, self.args)
            self._context.enter_context(sdpa_backend_context(self.args.attention_backend))
        for i in range(self.args.warmup):
            self._generate(10_000_000 + i)
        # Not the children: in interleaved mode they are the other arms' servers.
        self.idle = {"rss": PeakRSS(os.getpid(), children=False).sample()}
        if self.device.type == "cuda":
            self.idle["gpu_allocated"] = torch.cuda.memory_allocated(self.device)

    def _generate(self, seed: int, on_first_step: Callable[[], None] | None = None) -> None:
        import torch

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if step == 0 and on_first_step is not None:
                on_first_step()
            return {}

        self.pipe(
            self.args.prompt,
            num_inference_steps=self.args.steps,
            height=self.args.size,
            width=self.args.size,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=callback,
            output_type="pil",  # the images reach the host, as the server's do (the copy synchronises a GPU)
        )

    def run(self, offsets: list[float], seeds: list[int]) -> Run:
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        run = Run()
        with PeakRSS(os.getpid(), children=False) as rss:
            start = time.perf_counter()
            for offset, seed in zip(offsets, seeds, strict=True):
                arrival = start + offset
                delay = arrival - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)  # idle until the next arrival (open loop)
                first: list[float] = []
                try:
                    self._generate(seed, lambda first=first: first.append(time.perf_counter()))
                except Exception as exc:  # noqa: BLE001 - counted and reported like a server error
                    run.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                done = time.perf_counter()
                run.samples.append(Sample(done - arrival, first[0] - arrival if first else None))
                run.makespan_s = done - start
        run.peak_rss = rss.peak
        if cuda:
            run.gpu_peak = torch.cuda.max_memory_allocated(self.device)
        return run

    def stop(self) -> None:
        self._context.close()
        self.pipe = None
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_FIRST_STEP = re.compile(r"first_step;dur=([0-9.]+)")


class ServerArm:
    """``serverasync.py`` in a subprocess on a loopback port, driven over real HTTP by one asyncio client."""

    def __init__(
        self, name: str, args: argparse.Namespace, extra: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = args
        self.extra = extra
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.workdir: Path | None = None
        self.idle: dict[str, int | None] = {}
        self.cuda = False
        self.command: list[str] = []
        self._log_file: Any = None

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.command = [
            sys.executable,
            str(REPO / "serverasync.py"),
            "--model",
            self.args.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",  # its images and its jobs (the default store, jobs.db) in its own folder
            str(self.workdir),
            "--log-level",
            "warning",
            # The reference has no deadline; a slow shared machine must not turn waits into 504s in either arm.
            "--request-timeout",
            "0",
            "--max-steps",
            str(max(100, self.args.steps)),
        ]
        if self.args.device:
            self.command += ["--device", self.args.device]
        if self.args.dtype:
            self.command += ["--dtype", self.args.dtype]
        self.command += self.extra
        log(f"{self.name}: starting {self.describe()}")
        self._log_file = open(self.workdir / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        self._wait_ready()
        with httpx.Client(base_url=self.url, timeout=None, trust_env=False) as client:
            status = client.get("/api/status").json()
            self.cuda = str(status.get("device", "")).startswith("cuda")
            for i in range(self.args.warmup):
                response = client.post("/api/diffusers/inference", json=self._body(10_000_000 + i))
                if response.status_code != 200:
                    raise RuntimeError(f"{self.name}: warm-up request failed: {response.status_code} {response.text}")
            burst = getattr(self.args, "warmup_burst", 0)
            if burst:
                warm = Run()
                asyncio.run(self._drive([0.0] * burst, [11_000_000 + i for i in range(burst)], warm))
                if warm.failures:
                    raise RuntimeError(f"{self.name}: warm-up burst failed: {warm.failures[0]}")
            memory = client.get("/api/status").json().get("memory", {})
        self.idle = {"rss": PeakRSS(self.proc.pid).sample(), "gpu_allocated": memory.get("gpu_allocated_bytes")}

    def describe(self) -> str:
        """The server's command line as run (environment overrides first), for the report."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        # The port and the temporary data directory change from run to run: placeholders read better.
        shown = ["python", "serverasync.py"]
        for previous, value in zip(self.command[1:], self.command[2:], strict=False):
            shown.append({"--port": "PORT", "--data-dir": "TMPDIR"}.get(previous, value))
        line = shlex.join(shown)
        return f"{env} {line}".strip()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.args.load_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2, trust_env=False).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: not ready after {self.args.load_timeout}s:\n{self.log_tail()}")

    def batching(self) -> dict[str, Any] | None:
        """The step engine's batching figures from /api/status (loops, calibration, pass-time table); None if the
        server has none (the threads engine) or does not answer."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return httpx.get(f"{self.url}/api/status", timeout=10, trust_env=False).json()["engine"].get("batching")
        return None

    def log_tail(self, lines: int = 30) -> str:
        if self.workdir is None or not (self.workdir / "server.log").exists():
            return ""
        return "\n".join((self.workdir / "server.log").read_text(errors="replace").splitlines()[-lines:])

    def _body(self, seed: int) -> dict[str, Any]:
        return {
            "prompt": self.args.prompt,
            "num_inference_steps": self.args.steps,
            "height": self.args.size,
            "width": self.args.size,
            "seed": seed,
        }

    def run(self, offsets: list[float], seeds: list[int]) -> Run:
        assert self.proc is not None
        run = Run()
        with PeakRSS(self.proc.pid) as rss:
            asyncio.run(self._drive(offsets, seeds, run))
        run.peak_rss = rss.peak
        return run

    async def _drive(self, offsets: list[float], seeds: list[int], run: Run) -> None:
        # No client-side limit: every request is on the wire at its arrival time, as with the reference's clients.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.url, timeout=None, limits=limits, trust_env=False) as client:
            stop = asyncio.Event()
            poller = asyncio.create_task(self._poll_gpu(client, run, stop)) if self.cuda else None
            start = time.perf_counter() + 0.02  # every task is scheduled before the first arrival
            finished: list[float] = []

            async def one(offset: float, seed: int) -> None:
                arrival = start + offset
                delay = arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    response = await client.post("/api/diffusers/inference", json=self._body(seed))
                except httpx.HTTPError as exc:
                    run.failures.append(f"{type(exc).__name__}: {exc}")
                    return
                done = time.perf_counter()
                if response.status_code != 200:
                    run.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    return
                match = _FIRST_STEP.search(response.headers.get("server-timing", ""))
                # first_step is measured by the server from the request's arrival there.
                first = float(match.group(1)) / 1000 if match else None
                run.samples.append(Sample(done - arrival, first))
                finished.append(done)

            await asyncio.gather(*(one(o, s) for o, s in zip(offsets, seeds, strict=True)))
            run.makespan_s = (max(finished) - start) if finished else 0.0
            if poller is not None:
                stop.set()
                await poller
                memory = (await client.get("/api/status")).json().get("memory", {})
                run.gpu_max_cumulative = memory.get("gpu_max_allocated_bytes")

    @staticmethod
    async def _poll_gpu(client: httpx.AsyncClient, run: Run, stop: asyncio.Event) -> None:
        """Sample the server's allocated GPU memory (its peak counter can't be reset from outside)."""
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                memory = (await client.get("/api/status")).json().get("memory", {})
                value = memory.get("gpu_allocated_bytes")
                if value is not None:
                    run.gpu_peak = max(run.gpu_peak or 0, value)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self._log_file is not None:
            self._log_file.close()
        if self.workdir is not None and not self.args.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)


def make_arm(name: str, args: argparse.Namespace) -> Arm:
    if name == "serial":
        return SerialArm(name, args)
    if name == "serial-opt":
        return SerialArm(name, args, with_options=True)
    if name == "thread":
        return ServerArm(name, args, ["--max-concurrency", "256", "--max-queue", "1000"])
    if name == "threads":
        # The threads engine by name, whatever the server's default is (the engines' comparison: --sizes).
        return ServerArm(name, args, ["--engine", "threads"])
    if name == "step":
        # The step engine (one worker batching the transformer across requests), otherwise the server's defaults.
        return ServerArm(name, args, ["--engine", "step"])
    if name == "step-compile":
        # The step engine with its transformer blocks compiled (the server's --compile; the warm-up compiles).
        return ServerArm(name, args, ["--engine", "step", "--compile"])
    # ours: the server's defaults, unless a candidate configuration is being tried (--ours-args, --ours-env).
    return ServerArm(name, args, shlex.split(args.ours_args), dict(e.split("=", 1) for e in args.ours_env))
