#!/usr/bin/env python
"""Workloads that tell the engines apart, on server arms over HTTP (see bench/README.md):

- a mixed-resolution burst: N requests at once, sizes alternating between two (64 and 128 by default);
- a late arrival: 8 requests generating, then one more: its time to first step (Server-Timing ``first_step``,
  from its arrival at the server), against the per-step time of a request alone;
- a lone request in this process, no HTTP: a plain pipeline call against the step engine (``--lone``).

Example: ``python bench/step_workloads.py --arms ours,step --markdown bench/RESULTS.md``
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, str(Path(BENCH_DIR).parent))  # the repository: utils, Pipelines

import httpx  # noqa: E402
from benchlib.arms import ServerArm  # noqa: E402
from benchlib.common import log, publish  # noqa: E402

NATIVE = "/api/diffusers/inference"
ARM_FLAGS = {"ours": [], "threads": ["--engine", "threads"], "step": ["--engine", "step"]}


def _body(args: argparse.Namespace, seed: int, size: int) -> dict[str, Any]:
    return {"prompt": args.prompt, "num_inference_steps": args.steps, "height": size, "width": size, "seed": seed}


async def _send(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, float]:
    sent = time.perf_counter()
    response = await client.post(NATIVE, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    timing = dict(
        part.strip().split(";dur=") for part in response.headers.get("server-timing", "").split(",") if "dur=" in part
    )
    return {"latency": time.perf_counter() - sent, **{k: float(v) / 1000 for k, v in timing.items()}}


async def mixed_burst(url: str, args: argparse.Namespace) -> dict[str, Any]:
    sizes = [args.sizes[i % len(args.sizes)] for i in range(args.burst)]
    async with httpx.AsyncClient(base_url=url, timeout=None, trust_env=False) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_send(client, _body(args, 100 + i, s)) for i, s in enumerate(sizes)))
        makespan = time.perf_counter() - start
    pairs = list(zip(results, sizes, strict=True))
    by_size = {s: statistics.mean(r["latency"] for r, z in pairs if z == s) for s in args.sizes}
    return {"images/s": len(sizes) / makespan, "mean s": statistics.mean(r["latency"] for r in results), **by_size}


async def late_arrival(url: str, args: argparse.Namespace) -> dict[str, Any]:
    size = max(args.sizes)
    async with httpx.AsyncClient(base_url=url, timeout=None, trust_env=False) as client:
        alone = await _send(client, _body(args, 7, size))
        running = [asyncio.create_task(_send(client, _body(args, 200 + i, size))) for i in range(8)]
        deadline = time.monotonic() + 120
        while (await client.get("/api/status")).json()["active_inferences"] < min(8, args.slots):
            if time.monotonic() > deadline:
                raise RuntimeError("the 8 requests never ran")
            await asyncio.sleep(0.01)
        await asyncio.sleep(alone["generate"] / 4)  # well into their generation
        late = await _send(client, _body(args, 300, size))
        await asyncio.gather(*running)
    return {"alone s": alone["latency"], "step s (alone)": alone["generate"] / args.steps, **late}


def lone_in_process(args: argparse.Namespace, repeats: int = 5) -> str:
    """Median latency of one request alone: a plain pipeline call and the step engine, in this process."""
    import torch

    from engine import GenerationRequest
    from engine.step import StepRunner
    from Pipelines import TextToImagePipelineSD3
    from utils import RequestScopedPipeline

    size = max(args.sizes)
    loaded = TextToImagePipelineSD3(args.model, device=args.device or "cpu").start()
    pipe, device = loaded.pipeline, torch.device(args.device or "cpu")
    cores = torch.get_num_threads() if device.type == "cpu" else None
    step = StepRunner(RequestScopedPipeline(pipe), device, cpu_threads=cores)

    def plain(seed: int) -> None:
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe(prompt=args.prompt, num_inference_steps=args.steps, height=size, width=size, generator=generator)

    def stepped(seed: int) -> None:
        request = GenerationRequest(args.prompt, args.steps, 1, seed, size, size)
        step(request, lambda index: None)

    times: dict[str, list[float]] = {"plain": [], "step": []}
    try:
        for call in (plain, stepped):
            call(0)  # warm-up
        for seed in range(repeats):
            for name, call in (("plain", plain), ("step", stepped)):
                started = time.perf_counter()
                call(seed)
                times[name].append(time.perf_counter() - started)
    finally:
        step.close()
    p, s = statistics.median(times["plain"]), statistics.median(times["step"])
    return (
        f"- **lone request, in process** ({size}x{size}, median of {repeats}): plain pipeline call {p:.3f} s, "
        f"step engine {s:.3f} s: **{s / p:.2f}x**"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[64, 128])
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--arms", type=lambda t: t.split(","), default=["ours", "step"])
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--lone", action="store_true", help="also time a lone request in process (plain vs step)")
    args = parser.parse_args(argv)
    # What ServerArm reads of the options (the same server flags as bench/bench.py gives).
    args.size, args.warmup, args.load_timeout, args.keep_logs = max(args.sizes), 2, 900.0, False
    args.prompt = "a photo of an astronaut riding a horse on the beach"
    lines = [f"## Step-engine workloads, {args.model}, {args.steps} steps", ""]
    lines += ["```", "python " + shlex.join(["bench/step_workloads.py", *(sys.argv[1:] if argv is None else argv)])]
    lines += ["```", ""]
    for name in args.arms:
        arm = ServerArm(name, args, ARM_FLAGS[name])
        arm.start()
        try:
            with httpx.Client(base_url=arm.url, trust_env=False) as client:
                args.slots = client.get("/api/status").json()["max_concurrency"]
            log(f"{name}: mixed burst")
            mixed = asyncio.run(mixed_burst(arm.url, args))
            log(f"{name}: late arrival")
            late = asyncio.run(late_arrival(arm.url, args))
        finally:
            arm.stop()
        lines.append(f"- **{name}** (`{arm.describe()}`):")
        lines.append(
            f"  mixed burst of {args.burst} ({'/'.join(map(str, args.sizes))}): {mixed['images/s']:.3f} images/s, "
            f"mean {mixed['mean s']:.3f} s (" + ", ".join(f"{s}x{s}: {mixed[s]:.3f} s" for s in args.sizes) + ")"
        )
        lines.append(
            f"  late arrival while 8 generate: first step after {late.get('first_step', float('nan')):.3f} s "
            f"(queued {late.get('queue', 0):.3f} s, done in {late['latency']:.3f} s); a request alone: "
            f"{late['alone s']:.3f} s, {late['step s (alone)'] * 1000:.1f} ms per step (generate / steps)"
        )
    if args.lone:
        log("lone request in process")
        lines.append(lone_in_process(args))
    text = "\n".join(lines)
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
