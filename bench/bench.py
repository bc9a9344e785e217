#!/usr/bin/env python
"""Side-by-side benchmark: serial pipeline calls, thread-per-request, and our server, on one model and workload.

Arms (see bench/README.md):
- ``serial``: plain ``pipe(...)`` calls one after another in this process: the machine's compute limit.
- ``serial-opt``: the same with the GPU options given (``--fuse-qkv``, ``--attention-backend``, ``--compile``);
  added automatically when any option is set, to measure whether it helps before a server adopts it.
- ``thread``: the reference's approach: every request in its own thread on a request-scoped view, no admission
  limit (our server with ``--max-concurrency 256 --max-queue 1000``), over HTTP.
- ``ours``: our server with its default scheduling, over HTTP.

Workloads: bursts of N simultaneous requests, then open-loop Poisson arrivals at fractions of the serial arm's
measured capacity. Tables go to stdout (Markdown); progress goes to stderr. Exit status: 0 when every request
succeeded, 1 when some failed, 2 for bad arguments.

Example: ``python bench/bench.py --bursts 1,4,16 --markdown bench/RESULTS.md``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Set before transformers is imported: the tokenizers' own thread pool would fight the generation threads.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARMS = ("serial", "serial-opt", "thread", "ours")
# Issue targets for a burst (ours vs the other arms); reported, never asserted.
TARGET_MIN_BURST = 16
TARGET_VS_THREAD_THROUGHPUT = 1.0
TARGET_VS_SERIAL_THROUGHPUT = 0.9
TARGET_VS_THREAD_LATENCY = 0.7
MIB = 1 << 20
GIB = 1 << 30


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request: latency from its (scheduled) arrival, and arrival -> first denoising step done."""

    latency_s: float
    first_step_s: float | None


@dataclass
class Run:
    """One execution of a workload by one arm."""

    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    makespan_s: float = 0.0  # first arrival -> last completion
    peak_rss: int = 0
    gpu_peak: int | None = None  # highest allocated GPU bytes seen during the run
    gpu_max_cumulative: int | None = None  # server arms: max allocated since the server started


@dataclass
class Stats:
    """A workload's runs (all repeats) of one arm, pooled."""

    arm: str
    runs: list[Run]

    @property
    def samples(self) -> list[Sample]:
        return [s for r in self.runs for s in r.samples]

    @property
    def failures(self) -> list[str]:
        return [f for r in self.runs for f in r.failures]

    @property
    def throughput(self) -> float:
        """Images per second: completed images over the summed makespans."""
        span = sum(r.makespan_s for r in self.runs)
        return len(self.samples) / span if span > 0 else float("nan")

    def latency(self, q: float | None = None) -> float:
        values = [s.latency_s for s in self.samples]
        if not values:
            return float("nan")
        return float(np.mean(values)) if q is None else float(np.percentile(values, q))

    def first_step(self, q: float | None = None) -> float:
        values = [s.first_step_s for s in self.samples if s.first_step_s is not None]
        if not values:
            return float("nan")
        return float(np.mean(values)) if q is None else float(np.percentile(values, q))

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)

    @property
    def gpu_peak(self) -> int | None:
        values = [r.gpu_peak for r in self.runs if r.gpu_peak is not None]
        return max(values) if values else None

    @property
    def gpu_max_cumulative(self) -> int | None:
        values = [r.gpu_max_cumulative for r in self.runs if r.gpu_max_cumulative is not None]
        return max(values) if values else None


class PeakRSS:
    """Samples the resident memory of a process and its children in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05, children: bool = True) -> None:
        self.pid = pid
        self.children = children
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        try:
            proc = psutil.Process(self.pid)
            procs = [proc, *(proc.children(recursive=True) if self.children else [])]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak = max(self.peak, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---------------------------------------------------------------------------------------------------------
# GPU options (serial-opt arm). Applied once at load, before any request: nothing here changes per request.
# ---------------------------------------------------------------------------------------------------------


class FusedJointAttnProcessor:
    """SD3 / SD3.5 joint attention with fused QKV projections.

    diffusers' own ``fuse_qkv_projections()`` (0.42) installs ``FusedJointAttnProcessor2_0``, which skips the
    qk RMSNorm of SD3.5 (different images) and fails on its MMDiT-X self-attention (``attn2``, no context). This
    one mirrors ``JointAttnProcessor2_0`` exactly, with one projection where it has three.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual name

        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        head_dim = key.shape[-1] // attn.heads

        def split_heads(t: Any) -> Any:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = (split_heads(t) for t in attn.to_added_qkv(encoder_hidden_states).chunk(3, -1))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def fuse_qkv(transformer: Any) -> int:
    """Fuse every attention's Q, K, V (and context Q, K, V) projections; return how many modules changed.

    The separate projections are deleted afterwards, so the weights are held once.
    """
    from diffusers.models.attention_processor import Attention

    fused = 0
    for module in transformer.modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        module.fuse_projections(fuse=True)
        unused = ["to_q", "to_k", "to_v"]
        if getattr(module, "to_added_qkv", None) is not None:
            unused += ["add_q_proj", "add_k_proj", "add_v_proj"]
        for name in unused:
            delattr(module, name)
        module.set_processor(FusedJointAttnProcessor())
        fused += 1
    return fused


SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")


def sdpa_backend_context(name: str) -> contextlib.AbstractContextManager[Any]:
    """Restrict torch's scaled_dot_product_attention to one backend.

    SD3's attention processors call torch's SDPA directly, so this (not diffusers' ``set_attention_backend``,
    which SD3's processors ignore in diffusers 0.42) is what picks the kernel. The flags are process-global, not
    per thread: a server must set them once at start, never per request.
    """
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])


def apply_options(pipe: Any, args: argparse.Namespace) -> list[str]:
    """Apply --fuse-qkv and --compile to a loaded pipeline; return what was done, for the report."""
    done: list[str] = []
    if args.fuse_qkv:
        done.append(f"fused QKV in {fuse_qkv(pipe.transformer)} attention modules")
    if args.compile:
        # In place (nn.Module.compile), so the pipeline keeps its transformer object and config. Compilation is
        # not thread-safe: here one thread warms it up before any timed request.
        pipe.transformer.compile(mode=args.compile_mode, fullgraph=False)
        done.append(f"torch.compile(transformer, mode={args.compile_mode})")
    if args.attention_backend != "default":
        done.append(f"SDPA backend {args.attention_backend}")
    return done


def options_given(args: argparse.Namespace) -> bool:
    return bool(args.fuse_qkv or args.compile or args.attention_backend != "default")


# ---------------------------------------------------------------------------------------------------------
# FLOP estimate (the physical floor), from the model's configs on the meta device: nothing is allocated.
# ---------------------------------------------------------------------------------------------------------


def estimate_flops(pipe: Any, size: int, steps: int, cfg: bool = True) -> float | None:
    """FLOPs of one image: text encoders (prompt and negative), ``steps`` transformer passes, one VAE decode."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        batch = 2 if cfg else 1
        latent = size // int(getattr(pipe, "vae_scale_factor", 8))
        with torch.device("meta"):
            transformer = type(pipe.transformer).from_config(pipe.transformer.config)
            vae = type(pipe.vae).from_config(pipe.vae.config)
            encoders = [
                (type(enc)(enc.config), length)
                for enc, length in (
                    (pipe.text_encoder, 77),
                    (pipe.text_encoder_2, 77),
                    (pipe.text_encoder_3, 256),  # the pipeline's default max_sequence_length
                )
                if enc is not None
            ]
        total = 0.0
        tc = transformer.config
        with torch.no_grad():
            for enc, length in encoders:
                ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
                with FlopCounterMode(display=False) as counter:
                    enc(ids)
                total += counter.get_total_flops()
            context = 77 + 256
            with FlopCounterMode(display=False) as counter:
                transformer(
                    hidden_states=torch.empty(batch, tc.in_channels, latent, latent, device="meta"),
                    encoder_hidden_states=torch.empty(batch, context, tc.joint_attention_dim, device="meta"),
                    pooled_projections=torch.empty(batch, tc.pooled_projection_dim, device="meta"),
                    timestep=torch.empty(batch, device="meta"),
                )
            total += steps * counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                vae.decode(torch.empty(1, vae.config.latent_channels, latent, latent, device="meta"))
            total += counter.get_total_flops()
        return total
    except Exception as exc:  # noqa: BLE001 - an estimate is a nicety; the benchmark goes on without it
        log(f"FLOP estimate unavailable: {type(exc).__name__}: {exc}")
        return None


# ---------------------------------------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------------------------------------


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
            "--image-dir",
            str(self.workdir / "images"),
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
            memory = client.get("/api/status").json().get("memory", {})
        self.idle = {"rss": PeakRSS(self.proc.pid).sample(), "gpu_allocated": memory.get("gpu_allocated_bytes")}

    def describe(self) -> str:
        """The server's command line as run (environment overrides first), for the report."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        # The port and the temporary image directory change from run to run: placeholders read better.
        shown = ["python", "serverasync.py"]
        for previous, value in zip(self.command[1:], self.command[2:], strict=False):
            shown.append({"--port": "PORT", "--image-dir": "TMPDIR"}.get(previous, value))
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
    # ours: the server's defaults, unless a candidate configuration is being tried (--ours-args, --ours-env).
    return ServerArm(name, args, shlex.split(args.ours_args), dict(e.split("=", 1) for e in args.ours_env))


# ---------------------------------------------------------------------------------------------------------
# Workloads and the driver
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    kind: str  # "burst" or "poisson"
    value: float  # N, or the fraction of serial capacity
    requests: int
    rate: float | None = None  # arrivals per second (poisson)

    @property
    def label(self) -> str:
        if self.kind == "burst":
            return f"burst N={int(self.value)}"
        return f"poisson {self.value:g}x capacity ({self.rate:.3g} req/s, {self.requests} requests)"

    def offsets(self, repeat: int, seed: int) -> list[float]:
        """Arrival times in seconds from the start; the same for every arm (fixed seed per workload/repeat)."""
        if self.kind == "burst" or not self.rate:
            return [0.0] * self.requests
        rng = random.Random(seed * 1_000_003 + int(self.value * 1000) * 101 + repeat)
        times, now = [0.0], 0.0
        for _ in range(self.requests - 1):
            now += rng.expovariate(self.rate)
            times.append(now)
        return times


class Seeds:
    """A distinct generation seed for every request of a workload's repeat, the same ones for every arm."""

    def __init__(self, start: int) -> None:
        self.next = start
        self._given: dict[tuple[str, int], list[int]] = {}

    def take(self, workload: Workload, repeat: int) -> list[int]:
        key = (workload.label, repeat)
        if key not in self._given:
            self._given[key] = list(range(self.next, self.next + workload.requests))
            self.next += workload.requests
        return self._given[key]


@dataclass
class Report:
    args: argparse.Namespace
    command: str
    arms: list[str]
    machine: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Stats]] = field(default_factory=dict)  # workload label -> arm -> stats
    workloads: list[Workload] = field(default_factory=list)
    idle: dict[str, dict[str, int | None]] = field(default_factory=dict)
    capacity: float | None = None
    capacity_from: str = ""
    flops: float | None = None
    applied: list[str] = field(default_factory=list)
    servers: dict[str, str] = field(default_factory=dict)  # arm -> server command line
    elapsed_s: float = 0.0

    def add(self, workload: Workload, arm: str, run: Run) -> None:
        if workload.label not in self.results:
            self.results[workload.label] = {}
            self.workloads.append(workload)
        self.results[workload.label].setdefault(arm, Stats(arm, [])).runs.append(run)


def run_workload(arm: Arm, workload: Workload, repeat: int, args: argparse.Namespace, seeds: Seeds) -> Run:
    log(f"{arm.name}: {workload.label}, repeat {repeat + 1}/{args.repeats}")
    run = arm.run(workload.offsets(repeat, args.seed), seeds.take(workload, repeat))
    if run.failures:
        log(f"{arm.name}: {len(run.failures)} failed request(s), first: {run.failures[0]}")
    return run


def capacity_of(report: Report, bursts: list[Workload]) -> tuple[float, str]:
    """Serial capacity (images/s) from the largest burst; another arm's if serial did not run."""
    largest = max(bursts, key=lambda w: w.value).label
    for arm in ("serial", "serial-opt", "ours", "thread"):
        stats = report.results.get(largest, {}).get(arm)
        if stats is not None and stats.samples:
            return stats.throughput, arm
    raise RuntimeError("no burst completed: cannot set the Poisson rates")


def benchmark(args: argparse.Namespace, report: Report) -> None:
    import torch

    from utils.random_models import is_random_preset

    seeds = Seeds(args.seed * 1000)
    bursts = [Workload("burst", n, n) for n in args.bursts]
    # Interleaving arms per workload spreads a shared machine's load drift evenly over the arms; it keeps every
    # server loaded at once, so on a GPU (memory) the arms run one after another instead.
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    interleave = not on_cuda if args.interleave == "auto" else args.interleave == "yes"
    arms: dict[str, Arm] = {}

    def started(name: str) -> Arm:
        if name not in arms:
            arm = make_arm(name, args)
            arm.start()
            arms[name] = arm
            report.idle[name] = arm.idle
            if isinstance(arm, ServerArm):
                report.servers[name] = arm.describe()
            if isinstance(arm, SerialArm):
                report.applied = report.applied or arm.applied
                if report.flops is None:
                    report.flops = estimate_flops(arm.pipe, args.size, args.steps)
        return arms[name]

    def poisson() -> list[Workload]:
        if report.capacity is None:
            report.capacity, report.capacity_from = capacity_of(report, bursts)
        return [Workload("poisson", f, args.poisson_requests, f * report.capacity) for f in args.poisson_rates]

    if not any(name.startswith("serial") for name in report.arms) and is_random_preset(args.model):
        from utils.random_models import build_random_pipeline

        report.flops = estimate_flops(build_random_pipeline(args.model, device="meta"), args.size, args.steps)
    try:
        if interleave:
            for name in report.arms:
                started(name)
            for workload in bursts:
                for repeat in range(args.repeats):
                    for name in report.arms:
                        report.add(workload, name, run_workload(arms[name], workload, repeat, args, seeds))
            for workload in poisson() if args.poisson_rates else []:
                for repeat in range(args.repeats):
                    for name in report.arms:
                        report.add(workload, name, run_workload(arms[name], workload, repeat, args, seeds))
        else:
            for name in report.arms:
                arm = started(name)
                for workload in bursts:
                    for repeat in range(args.repeats):
                        report.add(workload, name, run_workload(arm, workload, repeat, args, seeds))
                for workload in poisson() if args.poisson_rates else []:
                    for repeat in range(args.repeats):
                        report.add(workload, name, run_workload(arm, workload, repeat, args, seeds))
                arm.stop()
                del arms[name]
    finally:
        for arm in arms.values():
            arm.stop()


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> dict[str, str]:
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable)",
        "memory": f"{psutil.virtual_memory().total / GIB:.1f} GiB",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (intra-op threads {torch.get_num_threads()})",
        "diffusers": diffusers.__version__,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device"] = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    else:
        info["device"] = device
    return info


def fmt_s(value: float) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(num: float, den: float) -> str:
    if not (num == num and den == den) or den == 0:
        return "n/a"
    return f"{num / den:.2f}x"


def fmt_mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f} MiB"


def fmt_gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def render(report: Report) -> str:
    args = report.args
    cuda = any(v.get("gpu_allocated") is not None for v in report.idle.values())
    out: list[str] = []
    out.append(
        f"## Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: {args.model}, {args.size}x{args.size}, "
        f"{args.steps} steps"
    )
    out.append("")
    out.append("```")
    out.append(report.command)
    out.append("```")
    out.append("")
    for key, value in report.machine.items():
        out.append(f"- {key}: {value}")
    out.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    out.append(
        f"- repeats: {args.repeats}, warm-up requests per arm: {args.warmup}, wall time {report.elapsed_s:.0f} s"
    )
    if report.flops:
        out.append(f"- FLOP per image (estimate, CFG on): {report.flops / 1e12:.4g} TFLOP")
    if report.capacity:
        out.append(
            f"- capacity for the Poisson rates: {report.capacity:.3f} images/s (largest burst, {report.capacity_from})"
        )
    if report.applied:
        out.append(f"- serial-opt options: {'; '.join(report.applied)}")
    for arm, line in report.servers.items():
        out.append(f"- {arm} server: `{line}`")
    idle = ", ".join(
        f"{arm} {fmt_mib(v.get('rss'))} RSS"
        + (f" / {fmt_gib(v.get('gpu_allocated'))} GPU" if v.get("gpu_allocated") is not None else "")
        for arm, v in report.idle.items()
    )
    out.append(f"- idle memory after warm-up (weights): {idle}")
    out.append("")

    summary: list[str] = []
    for workload in report.workloads:
        by_arm = report.results[workload.label]
        out.append(f"### {workload.label}")
        out.append("")
        header = "| arm | images/s | mean s | p50 s | p95 s | max s | first step mean s | first step p95 s | peak RSS |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        if cuda:
            header += " GPU peak alloc | GPU max alloc (cum.) |"
            rule += "---:|---:|"
        header += " failed |"
        rule += "---:|"
        out += [header, rule]
        for arm in report.arms:
            stats = by_arm.get(arm)
            if stats is None:
                continue
            row = (
                f"| {arm} | {stats.throughput:.3f} | {fmt_s(stats.latency())} | {fmt_s(stats.latency(50))} | "
                f"{fmt_s(stats.latency(95))} | {fmt_s(stats.latency(100))} | {fmt_s(stats.first_step())} | "
                f"{fmt_s(stats.first_step(95))} | {fmt_mib(stats.peak_rss)} |"
            )
            if cuda:
                row += f" {fmt_gib(stats.gpu_peak)} | {fmt_gib(stats.gpu_max_cumulative)} |"
            out.append(row + f" {len(stats.failures)} |")
        ours, thread, serial = by_arm.get("ours"), by_arm.get("thread"), by_arm.get("serial")
        ratios = {
            "ours/thread images/s": fmt_ratio(ours.throughput, thread.throughput) if ours and thread else "n/a",
            "ours/serial images/s": fmt_ratio(ours.throughput, serial.throughput) if ours and serial else "n/a",
            "ours/thread mean latency": fmt_ratio(ours.latency(), thread.latency()) if ours and thread else "n/a",
            "ours/thread first step": fmt_ratio(ours.first_step(), thread.first_step()) if ours and thread else "n/a",
        }
        if serial and by_arm.get("serial-opt"):
            ratios["serial-opt/serial images/s"] = fmt_ratio(by_arm["serial-opt"].throughput, serial.throughput)
        shown = {k: v for k, v in ratios.items() if v != "n/a"}
        out.append("")
        if shown:
            out.append("Ratios: " + ", ".join(f"{k} **{v}**" for k, v in shown.items()))
            out.append("")
        verdict = ""
        if workload.kind == "burst" and workload.value >= TARGET_MIN_BURST and ours and thread and serial:
            met = (
                ours.throughput >= TARGET_VS_THREAD_THROUGHPUT * thread.throughput
                and ours.throughput >= TARGET_VS_SERIAL_THROUGHPUT * serial.throughput
                and ours.latency() <= TARGET_VS_THREAD_LATENCY * thread.latency()
            )
            verdict = "yes" if met else "no"
        summary.append(
            f"| {workload.label} | {ratios['ours/thread images/s']} | {ratios['ours/serial images/s']} | "
            f"{ratios['ours/thread mean latency']} | {ratios['ours/thread first step']} | {verdict or '-'} |"
        )

    if summary and "ours" in report.arms:
        out.append("### Summary: ours against the other arms")
        out.append("")
        out.append(
            f"Targets for a burst of N >= {TARGET_MIN_BURST}: images/s >= {TARGET_VS_THREAD_THROUGHPUT}x thread and >= "
            f"{TARGET_VS_SERIAL_THROUGHPUT}x serial, mean latency <= {TARGET_VS_THREAD_LATENCY}x thread (a smaller "
            "burst has little to schedule: one request waits as long whoever runs it)."
        )
        out.append("")
        out.append(
            "| workload | ours/thread images/s | ours/serial images/s | ours/thread mean latency | "
            "ours/thread first step | burst targets met |"
        )
        out.append("|---|---:|---:|---:|---:|:---:|")
        out += summary
        out.append("")

    if report.flops and (cuda or args.peak_tflops):
        peak = args.peak_tflops or 800.0
        floor = report.flops / (peak * 1e12)
        out.append(
            f"### Seconds per image against the floor ({report.flops / 1e12:.4g} TFLOP at {peak:g} TFLOP/s "
            f"= {floor:.3g} s)"
        )
        out.append("")
        out.append("| workload | " + " | ".join(f"{arm} s/image (share of peak)" for arm in report.arms) + " |")
        out.append("|---|" + "---:|" * len(report.arms))
        for workload in report.workloads:
            if workload.kind != "burst":
                continue
            cells = []
            for arm in report.arms:
                stats = report.results[workload.label].get(arm)
                if stats is None or not stats.samples:
                    cells.append("-")
                    continue
                per_image = 1 / stats.throughput
                cells.append(f"{per_image:.3g} ({floor / per_image:.0%})")
            out.append(f"| {workload.label} | " + " | ".join(cells) + " |")
        out.append("")

    if cuda:
        # One copy of the weights is the idle figure; the growth with N is the requests' activations.
        out.append("### GPU memory against concurrency (peak allocated; idle = the weights, held once)")
        out.append("")
        idle_cells = [fmt_gib(report.idle.get(arm, {}).get("gpu_allocated")) for arm in report.arms]
        out.append("| workload | " + " | ".join(report.arms) + " |")
        out.append("|---|" + "---:|" * len(report.arms))
        out.append("| idle after warm-up | " + " | ".join(idle_cells) + " |")
        for workload in report.workloads:
            if workload.kind != "burst":
                continue
            cells = []
            for arm in report.arms:
                stats = report.results[workload.label].get(arm)
                cells.append(fmt_gib(stats.gpu_peak if stats else None))
            out.append(f"| {workload.label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("every value must be >= 1")
    return values


def _fractions(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("every rate must be > 0")
    return values


def _arms(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/bench.py",
        description="Serial vs thread-per-request vs our server, side by side (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="random:tiny", help="hub id, local directory or random:<preset>")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the server's choice)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the server's choice)")
    parser.add_argument("--size", type=int, default=128, help="image width and height (pixels)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on the beach")
    parser.add_argument("--bursts", type=_ints, default=[1, 4, 16], help="burst sizes N, comma-separated")
    parser.add_argument(
        "--poisson-rates",
        type=lambda t: _fractions(t) if t.strip() else [],
        default=[0.5, 0.8, 1.0],
        help="open-loop arrival rates as fractions of the measured serial capacity ('' for none)",
    )
    parser.add_argument("--poisson-requests", type=int, default=24, help="requests per Poisson rate")
    parser.add_argument("--arms", type=_arms, default=["serial", "thread", "ours"], help=f"from {', '.join(ARMS)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every workload per arm (pooled)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests per arm after loading")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrival times and the image seeds")
    parser.add_argument(
        "--interleave",
        choices=("auto", "yes", "no"),
        default="auto",
        help="run the arms round-robin per workload (auto: yes on CPU, no on CUDA, where the servers' memory "
        "would add up)",
    )
    parser.add_argument("--load-timeout", type=float, default=900.0, help="seconds a server may take to load")
    parser.add_argument("--markdown", type=Path, default=None, help="append the report to this Markdown file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' temporary dirs and logs")
    parser.add_argument(
        "--ours-args",
        default="",
        help="extra server flags for the ours arm, to try a candidate default (e.g. '--max-concurrency 2'); "
        "the report shows the command",
    )
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the ours arm's server (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the floor (CUDA: 800)")
    options = parser.add_argument_group("GPU options (serial-opt arm; see bench/README.md)")
    options.add_argument("--fuse-qkv", action="store_true", help="fuse the attention QKV projections")
    options.add_argument("--attention-backend", choices=SDPA_BACKENDS, default="default", help="torch SDPA backend")
    options.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    options.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode (not reduce-overhead: CUDA graphs are unsafe with concurrent threads)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.poisson_requests < 1 or args.steps < 1:
        parser.error("--repeats, --poisson-requests and --steps must be >= 1, --warmup >= 0")
    if any("=" not in e for e in args.ours_env):
        parser.error("--ours-env takes KEY=VALUE")
    if args.size % 16:
        parser.error("--size must be a multiple of 16")
    if options_given(args) and "serial-opt" not in args.arms:
        args.arms.insert(args.arms.index("serial") + 1 if "serial" in args.arms else 0, "serial-opt")
    if "serial-opt" in args.arms and not options_given(args):
        parser.error("the serial-opt arm needs --fuse-qkv, --attention-backend or --compile")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join(["bench/bench.py", *(sys.argv[1:] if argv is None else argv)])
    report = Report(args=args, command=command, arms=args.arms)
    report.machine = machine_info(args)
    started = time.perf_counter()
    benchmark(args, report)
    report.elapsed_s = time.perf_counter() - started
    text = render(report)
    print(text, flush=True)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        with args.markdown.open("a") as handle:
            handle.write("\n" + text + "\n")
        log(f"report appended to {args.markdown}")
    failed = sum(len(s.failures) for by_arm in report.results.values() for s in by_arm.values())
    if failed:
        log(f"{failed} request(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
