#!/usr/bin/env python
"""A memory soak: does a server's resident memory stay flat over thousands of mixed requests? Both engines, side by
side, in one run.

Each engine is a real server subprocess (``serverasync.py --engine threads|step``, through ``benchlib.arms``), driven
over HTTP by ``--clients`` concurrent clients with a mixed workload (``Mix``): image sizes (square or not), steps,
images per prompt, guidance on or off, a negative prompt or none, more distinct prompts than the prompt cache holds,
and a share of edits (image-to-image and inpainting, a PNG sent as base64). Every request has its own seed; both
engines get the same requests in the same order. After a warm-up of the same mix (``--warmup-requests``, not
counted), the soak runs in blocks of ``--block`` requests, the engines taking turns block by block (a shared
machine's load falls on both alike). The server's RSS (psutil) is sampled after the warm-up and after each block,
once the server is idle again and ``--settle`` seconds have passed; its peak during each block is sampled too.

The table: per engine, RSS after the warm-up and after each block, the peak during each block, the growth over the
soak and over its second half (flat: the second half grows about 0). ``--heap`` adds what glibc's allocator holds
(``benchlib/heapprobe``: in use, free but kept, arenas) at each sample, and a last row after ``malloc_trim(0)``: RSS
that a trim gives back was free memory the allocator kept, not memory anything uses.

    python bench/soak_memory.py --markdown bench/RESULTS.md          # 2,000 requests per engine, both engines
    python bench/soak_memory.py --smoke --heap                         # a few requests: the shape of the report
    python bench/soak_memory.py --server-env MALLOC_ARENA_MAX=2        # a hypothesis, on both engines

Exit status: 0 when every request succeeded, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import random
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import httpx  # noqa: E402
import psutil  # noqa: E402
from benchlib.arms import ServerArm  # noqa: E402
from benchlib.common import MIB, log, publish  # noqa: E402
from benchlib.stats import PeakRSS  # noqa: E402

NATIVE = "/api/diffusers/inference"
ENGINES = ("threads", "step")
PROBE_DIR = BENCH_DIR / "benchlib" / "heapprobe"
WARMUP_FROM = 1_000_000  # the warm-up's requests (and seeds): none of the soak's
SUBJECTS = ("an astronaut riding a horse", "a lighthouse at dusk", "a bowl of fruit", "a city in the rain")


@dataclass
class Mix:
    """The mixed workload: request ``i`` of a run is the same in every engine (drawn from ``seed`` and ``i``)."""

    sizes: list[int]
    steps: list[int]
    prompts: int  # distinct prompts (more than the prompt cache holds: it evicts)
    edits: float  # share of edits, half image-to-image, half inpainting
    seed: int = 0
    _pictures: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)

    def body(self, i: int) -> tuple[str, dict[str, Any]]:
        """Request ``i``: its task and its native-API body."""
        rng = random.Random(self.seed * 1_000_003 + i)
        width, height = rng.choice(self.sizes), rng.choice(self.sizes)
        body: dict[str, Any] = {
            "prompt": f"{rng.choice(SUBJECTS)}, variation {rng.randrange(self.prompts)}",
            "num_inference_steps": rng.choice(self.steps),
            "num_images_per_prompt": rng.choice((1, 1, 2, 3)),
            "width": width,
            "height": height,
            "seed": i,
        }
        guidance = rng.random()
        if guidance < 0.4:
            body["guidance_scale"] = 1.0  # no classifier-free guidance: one sample per image
        elif guidance < 0.6:
            body["negative_prompt"] = f"blurry, variation {rng.randrange(self.prompts)}"
        task = "text-to-image"
        edit = rng.random()
        if edit < self.edits:
            image, mask = self.pictures(width, height)
            body["image"] = image
            task = "image-to-image"
            if edit < self.edits / 2:
                body["mask_image"], task = mask, "inpainting"
        return task, body

    def pictures(self, width: int, height: int) -> tuple[str, str]:
        """A seeded random picture of that size and a mask repainting its middle, both base64 PNGs."""
        import numpy as np
        from PIL import Image

        if (width, height) not in self._pictures:
            pixels = np.random.default_rng(width * 10_000 + height).integers(0, 256, (height, width, 3), np.uint8)
            mask = np.zeros((height, width), np.uint8)
            mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
            self._pictures[width, height] = (_png(Image.fromarray(pixels)), _png(Image.fromarray(mask)))
        return self._pictures[width, height]


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Sample:
    """The server's memory at one point of the soak."""

    label: str
    rss: int
    peak: int | None = None  # the highest RSS seen during the block before it
    heap: dict[str, Any] | None = None  # the heap probe's figures (--heap)
    threads: int | None = None  # the server's threads


@dataclass
class EngineSoak:
    """One engine's server, its samples and what its requests did."""

    name: str
    arm: ServerArm
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    loops: int | None = None  # the step engine's denoising loops (its start-up calibration chooses on a CPU)
    probe: Path | None = None

    def heap(self, trim: bool = False) -> dict[str, Any] | None:
        """The heap probe's figures now (after ``malloc_trim(0)`` when ``trim``); None without --heap."""
        if self.probe is None or self.arm.proc is None:
            return None
        self.probe.unlink(missing_ok=True)
        self.arm.proc.send_signal(signal.SIGUSR2 if trim else signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not self.probe.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: the heap probe did not answer")
            time.sleep(0.05)
        return json.loads(self.probe.read_text())

    def sample(self, label: str, settle: float, peak: int | None = None) -> None:
        time.sleep(settle)  # the engine's idle-time work (engine.admission: release when idle) runs first
        assert self.arm.proc is not None
        rss, threads = PeakRSS(self.arm.proc.pid).sample(), psutil.Process(self.arm.proc.pid).num_threads()
        self.samples.append(Sample(label, rss, peak, self.heap(), threads))


async def drive(url: str, mix: Mix, indices: range, clients: int, soak: EngineSoak) -> None:
    """Requests ``indices`` of the mix, ``clients`` at a time, each client sending its next as soon as one ends."""
    pending = iter(indices)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits, trust_env=False) as client:

        async def one_client() -> None:
            for i in pending:
                task, body = mix.body(i)
                try:
                    response = await client.post(NATIVE, json=body)
                except httpx.HTTPError as exc:
                    soak.failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    soak.failures.append(f"request {i} ({task}): HTTP {response.status_code}: {response.text[:200]}")
                    continue
                soak.tasks[task] = soak.tasks.get(task, 0) + 1

        await asyncio.gather(*(one_client() for _ in range(clients)))


def run_block(soak: EngineSoak, mix: Mix, indices: range, args: argparse.Namespace, label: str) -> None:
    assert soak.arm.proc is not None
    started = time.perf_counter()
    with PeakRSS(soak.arm.proc.pid, interval=0.1) as rss:
        asyncio.run(drive(soak.arm.url, mix, indices, args.clients, soak))
    soak.seconds += time.perf_counter() - started
    soak.sample(label, args.settle, rss.peak)


def start(name: str, args: argparse.Namespace, work: Path) -> EngineSoak:
    """The engine's server (``benchlib.arms.ServerArm``: its warm-up request, a free port, its own data directory)."""
    env = dict(item.split("=", 1) for item in args.server_env)
    probe = None
    if args.heap:
        probe = work / f"{name}-heap.json"
        path = os.pathsep.join(p for p in (str(PROBE_DIR), os.environ.get("PYTHONPATH", "")) if p)
        env.update(PYTHONPATH=path, SOAK_HEAP_PROBE=str(probe))
        env.update(SOAK_TRACEMALLOC=str(int(args.tracemalloc)), SOAK_TENSORS=str(int(args.tensors)))
    # What benchlib's ServerArm reads: the server's model and device, one plain warm-up request, small.
    arm_args = argparse.Namespace(
        model=args.model, device=args.device, dtype=args.dtype, prompt=SUBJECTS[0], size=min(args.sizes),
        steps=min(args.steps), warmup=1, load_timeout=args.load_timeout, keep_logs=args.keep_logs,
    )  # fmt: skip
    arm = ServerArm(name, arm_args, ["--engine", name, "--max-queue", "1000", *shlex.split(args.server_args)], env)
    arm.start()
    return EngineSoak(name, arm, probe=probe)


def soak_all(args: argparse.Namespace, mix: Mix, work: Path) -> list[EngineSoak]:
    soaks: list[EngineSoak] = []
    try:
        for name in args.engines:
            soaks.append(start(name, args, work))
        for soak in soaks:
            log(f"{soak.name}: warm-up, {args.warmup_requests} requests")
            warmup = range(WARMUP_FROM, WARMUP_FROM + args.warmup_requests)
            asyncio.run(drive(soak.arm.url, mix, warmup, args.clients, soak))
            soak.sample("after warm-up", args.settle)
            soak.seconds, soak.tasks = 0.0, {}
        for start_at in range(0, args.requests, args.block):
            indices = range(start_at, min(args.requests, start_at + args.block))
            for soak in soaks:
                log(f"{soak.name}: requests {indices.start + 1}-{indices.stop} of {args.requests}")
                run_block(soak, mix, indices, args, f"after {indices.stop:,}")
        for soak in soaks:
            if args.heap:
                trimmed = soak.heap(trim=True) or {}
                soak.samples.append(Sample("after malloc_trim(0)", int(trimmed.get("rss", 0)), heap=trimmed))
    finally:
        for soak in soaks:
            soak.loops = (soak.arm.batching() or {}).get("loops")
            soak.arm.stop()
    return soaks


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def _delta(value: int) -> str:
    return f"{value / MIB:+,.0f}"


def _cells(sample: Sample, heap: bool, tensors: bool) -> list[str]:
    cells = [_mib(sample.rss), _mib(sample.peak)]
    if heap:
        info = sample.heap or {}
        cells += [_mib(info.get("heap_in_use")), _mib(info.get("heap_free")), str(info.get("arenas", "-"))]
        cells.append(str(sample.threads or "-"))
        if tensors:
            count = info.get("tensor_storages")
            cells.append(f"{_mib(info.get('tensor_bytes'))} ({count})" if count is not None else "-")
    return cells


def growth(samples: list[Sample]) -> tuple[int, int, int]:
    """RSS growth over the soak (last block against the warm-up), over its second half (last against the middle
    block), and the peak's over its second half (the last block's against the middle block's)."""
    soaked = [s for s in samples if s.peak is not None]
    middle = soaked[(len(soaked) - 1) // 2] if soaked else samples[0]
    last = soaked[-1] if soaked else samples[0]
    return last.rss - samples[0].rss, last.rss - middle.rss, (last.peak or 0) - (middle.peak or 0)


def render(args: argparse.Namespace, command: str, soaks: list[EngineSoak]) -> str:
    """The samples of every engine side by side (MiB), then the growth rows, failures and times."""
    per = ["RSS", "peak in block"] + (["malloc in use", "malloc free, kept", "arenas", "threads"] if args.heap else [])
    per += ["tensors (storages)"] if args.heap and args.tensors else []
    header = "| | " + " | ".join(f"{soak.name}: {what}" for soak in soaks for what in per) + " |"
    out = [
        f"### Memory soak {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: {args.model}, "
        f"{args.requests:,} mixed requests per engine",
        "",
        "```",
        command,
        "```",
        "",
        f"- mix: sizes {args.sizes} (width and height drawn apart), steps {args.steps}, 1-3 images per prompt, "
        f"guidance off for 40%, a negative prompt for 20%, {args.prompts} distinct prompts, "
        f"{args.edits:.0%} edits (half inpainting); {args.clients} clients, blocks of {args.block}, "
        f"{args.warmup_requests} warm-up requests",
        f"- server options: --engine E --max-queue 1000 {args.server_args} {' '.join(args.server_env)}".rstrip(),
        f"- cpu: {os.cpu_count()} logical CPUs; load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    for soak in soaks:
        tasks = ", ".join(f"{n} {task}" for task, n in sorted(soak.tasks.items()))
        trim = next((s.heap["trim_s"] for s in soak.samples if s.heap and "trim_s" in s.heap), None)
        trimmed = "" if trim is None else f"; malloc_trim(0) at the end took {trim * 1000:.0f} ms"
        rate = args.requests / soak.seconds if soak.seconds else 0.0
        timing = f"{soak.seconds:.0f} s for the soak ({rate:.2f} requests/s)"
        timing += f", {soak.loops} denoising loop(s)" if soak.loops else ""
        out.append(f"- {soak.name}: {timing}; answered: {tasks}{trimmed}")
    out += ["", "RSS in MiB, sampled idle after each block; peak: the highest RSS during the block.", ""]
    out += [header, "|---" + "|---:" * (len(per) * len(soaks)) + "|"]
    for row, sample in enumerate(soaks[0].samples):
        cells = [c for soak in soaks for c in _cells(soak.samples[row], args.heap, args.tensors)]
        out.append(f"| {sample.label} | " + " | ".join(cells) + " |")
    pad = [""] * (len(per) - 2)
    rows = {"growth over the soak": [], "growth over the second half": [], "failed requests": []}
    for soak in soaks:
        whole, second, peak = growth(soak.samples)
        rows["growth over the soak"] += [_delta(whole), "", *pad]
        rows["growth over the second half"] += [_delta(second), _delta(peak), *pad]
        rows["failed requests"] += [str(len(soak.failures)), "", *pad]
    out += [f"| **{label}** | " + " | ".join(cells) + " |" for label, cells in rows.items()]
    for soak in soaks:
        last = next((s.heap for s in reversed(soak.samples) if s.heap and "grown" in s.heap), None)
        if last:
            out += ["", f"{soak.name}: Python's objects {_mib(last['traced_bytes'])} MiB (tracemalloc); grown most "
                    "since the warm-up:", "", *(f"- `{line}`" for line in last["grown"])]  # fmt: skip
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the server's auto)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--engines", type=lambda t: t.split(","), default=list(ENGINES))
    parser.add_argument("--requests", type=int, default=2000, help="requests per engine, after the warm-up")
    parser.add_argument("--block", type=int, default=250, help="requests between two samples")
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--sizes", type=ints, default=[32, 48, 64, 96])
    parser.add_argument("--steps", type=ints, default=[2, 4, 8])
    parser.add_argument("--prompts", type=int, default=600, help="distinct prompts (the prompt cache holds 256)")
    parser.add_argument("--edits", type=float, default=0.3, help="share of edits (half of them inpainting)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds idle before each sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heap", action="store_true", help="also what glibc's allocator holds (benchlib/heapprobe)")
    parser.add_argument("--tracemalloc", action="store_true", help="with --heap: Python's objects too (slow)")
    parser.add_argument("--tensors", action="store_true", help="with --heap: the CPU tensors alive too")
    parser.add_argument("--server-args", default="", help="more server options, both engines")
    parser.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for both servers")
    parser.add_argument("--smoke", action="store_true", help="a few requests, small and quick: the report's shape")
    parser.add_argument("--load-timeout", type=float, default=300)
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.block, args.warmup_requests, args.clients = 16, 8, 4, 4
        args.sizes, args.steps, args.settle = [32, 48], [1, 2], 0.5
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))} (threads, step)")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes KEY=VALUE")
    if min(args.requests, args.block, args.clients) < 1 or any(s % 16 for s in args.sizes):
        parser.error("--requests, --block and --clients must be >= 1, --sizes multiples of 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join(["bench/soak_memory.py", *(sys.argv[1:] if argv is None else argv)])
    mix = Mix(args.sizes, args.steps, args.prompts, args.edits, args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        soaks = soak_all(args, mix, Path(work))
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    for soak in soaks:
        for failure in soak.failures[:5]:
            log(f"{soak.name}: {failure}")
    publish(render(args, command, soaks), args.markdown)
    return 1 if any(soak.failures for soak in soaks) else 0


if __name__ == "__main__":
    sys.exit(main())
