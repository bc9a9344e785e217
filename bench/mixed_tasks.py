#!/usr/bin/env python
"""A mixed workload of every task (text-to-image, image-to-image, inpainting) on both engines, side by side.

In process, through the engine (no HTTP): each engine is built as the server builds it (``api.loading.build_engine``
with ``--engine threads`` or ``--engine step``, their default slots, the cores split as the server splits them), both
over one loaded pipeline, and fed the same bursts: N requests at the same instant, the tasks in turn (t2i, i2i,
inpaint, t2i, ...), each with its own seed, the same in both. The engines take turns burst by burst (a shared machine's
load falls on both alike). Reported per engine (``benchlib.stats``): images/s over the burst's makespan, mean and
p95 latency from the burst's start, the first step, the mean latency of each task; then the step/threads ratios.

Example: ``python bench/mixed_tasks.py --size 64 --steps 8 --bursts 6,12 --markdown bench/RESULTS.md``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from benchlib.common import log, publish  # noqa: E402 - puts the repository on sys.path
from benchlib.report import fmt_ratio, fmt_s  # noqa: E402
from benchlib.stats import Run, Sample, Stats  # noqa: E402

TASKS = ("text-to-image", "image-to-image", "inpainting")
SHORT = {"text-to-image": "t2i", "image-to-image": "i2i", "inpainting": "inpaint"}
ENGINES = ("threads", "step")


def inputs(size: int) -> tuple[Any, Any]:
    """The init image (a seeded random picture) and the mask (white = repaint: the middle half)."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return image, Image.fromarray(mask)


def burst_requests(args: argparse.Namespace, n: int, seed0: int) -> list[Any]:
    """``n`` requests, the tasks in turn; image-to-image and inpainting at their own default strength unless set."""
    from engine import GenerationRequest

    image, mask = inputs(args.size)
    requests = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        extra: dict[str, Any] = {}
        if task != "text-to-image":
            extra = {"image": image, "strength": args.strength}
        if task == "inpainting":
            extra["mask_image"] = mask
        requests.append(
            GenerationRequest(args.prompt, args.steps, 1, seed0 + i, args.size, args.size, task=task, **extra)
        )
    return requests


def build_engines(args: argparse.Namespace) -> dict[str, Any]:
    """Both engines over one loaded pipeline, as the server builds them (its settings: defaults but the engine)."""
    import torch

    from api.loading import build_engine
    from api.settings import parse_settings
    from Pipelines import TextToImagePipelineSD3

    loaded = TextToImagePipelineSD3(args.model, device=args.device or None).start()
    device = torch.device(loaded.device)
    engines = {}
    for kind in args.engines:
        flags = ["--model", args.model, "--engine", kind, "--request-timeout", "0", "--max-queue", "1000"]
        engine, _, _ = build_engine(parse_settings(flags, environ={}), loaded.pipeline, device)
        engine.set_ready()
        engines[kind] = engine
    return engines


async def run_burst(engine: Any, requests: list[Any]) -> tuple[Run, dict[str, list[float]]]:
    """Every request submitted at once; latency from that instant. Also each task's latencies."""
    run = Run()
    by_task: dict[str, list[float]] = {task: [] for task in TASKS}
    start = time.perf_counter()

    async def one(request: Any) -> None:
        try:
            result = await engine.submit(request)
        except Exception as exc:  # noqa: BLE001 - counted and shown, the burst goes on
            run.failures.append(f"{request.task}: {type(exc).__name__}: {exc}")
            return
        latency = time.perf_counter() - start
        run.samples.append(Sample(latency, result.first_step_s))
        by_task[request.task].append(latency)

    await asyncio.gather(*(one(r) for r in requests))
    run.makespan_s = time.perf_counter() - start
    return run, by_task


async def measure(args: argparse.Namespace, engines: dict[str, Any]) -> dict[int, dict[str, tuple[Stats, dict]]]:
    """Warm-up (one request of each task per engine), then every burst on every engine in turn, ``repeats`` times;
    all in one event loop, as a server runs."""
    for kind, engine in engines.items():
        log(f"{kind}: warm-up")
        await run_burst(engine, burst_requests(args, len(TASKS), 1))
    results: dict[int, dict[str, tuple[Stats, dict]]] = {}
    for repeat in range(args.repeats):
        for n in args.bursts:
            requests = burst_requests(args, n, 1000 * (repeat + 1))  # the same seeds on both engines
            for kind, engine in engines.items():
                log(f"{kind}: burst of {n} (repeat {repeat + 1}/{args.repeats})")
                run, by_task = await run_burst(engine, requests)
                stats, tasks = results.setdefault(n, {}).setdefault(kind, (Stats(kind, []), {t: [] for t in TASKS}))
                stats.runs.append(run)
                for task, values in by_task.items():
                    tasks[task].extend(values)
    return results


def render(
    args: argparse.Namespace, command: str, results: dict[int, dict[str, tuple[Stats, dict]]], passes: dict | None
) -> str:
    """One Markdown table per burst size (one row per engine), the ratios under it; the step engine's passes."""
    strength = "each task's default" if args.strength is None else str(args.strength)
    out = [
        f"### Mixed tasks {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: {args.model}, "
        f"{args.size}x{args.size}, {args.steps} steps",
        "",
        "```",
        command,
        "```",
        "",
        f"- tasks in turn: {', '.join(TASKS)}; strength: {strength}; repeats: {args.repeats}",
        f"- cpu: {os.cpu_count()} logical CPUs; load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    if passes:
        out.append(
            f"- step engine, warm-up included: {passes['passes']} transformer passes, {passes['mean_pass']:.2f} "
            f"images per pass on average (guidance halves counted), largest {passes['largest_pass']}"
        )
    out.append("")
    header = "| engine | images/s | mean s | p95 s | first step mean s | " + " | ".join(
        f"{SHORT[t]} mean s" for t in TASKS
    )
    for n, by_engine in results.items():
        out += [f"Burst of {n}:", "", header + " | failed |", "|---" * (len(TASKS) + 6) + "|"]
        for kind, (stats, tasks) in by_engine.items():
            per_task = " | ".join(fmt_s(statistics.mean(v)) if v else "-" for v in tasks.values())
            out.append(
                f"| {kind} | {stats.throughput:.3f} | {fmt_s(stats.latency())} | {fmt_s(stats.latency(95))} | "
                f"{fmt_s(stats.first_step())} | {per_task} | {len(stats.failures)} |"
            )
        if {"threads", "step"} <= by_engine.keys():
            step, threads = by_engine["step"][0], by_engine["threads"][0]
            out += [
                "",
                f"step/threads: images/s **{fmt_ratio(step.throughput, threads.throughput)}**, mean latency "
                f"{fmt_ratio(step.latency(), threads.latency())}, p95 latency "
                f"{fmt_ratio(step.latency(95), threads.latency(95))}",
            ]
        out.append("")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the server's auto)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strength", type=float, default=None, help="for i2i and inpaint (default: each task's)")
    parser.add_argument("--bursts", type=lambda t: [int(x) for x in t.split(",")], default=[6, 12])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engines", type=lambda t: t.split(","), default=list(ENGINES))
    parser.add_argument("--markdown", type=Path, default=None, help="append the tables to this file")
    args = parser.parse_args(argv)
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))} (threads, step)")
    args.prompt = "a photo of an astronaut riding a horse on the beach"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join(["bench/mixed_tasks.py", *(sys.argv[1:] if argv is None else argv)])
    engines = build_engines(args)
    try:
        results = asyncio.run(measure(args, engines))
        passes = engines["step"].runner.stats if "step" in engines else None
    finally:
        for engine in engines.values():
            engine.close()
    text = render(args, command, results, passes)
    publish(text, args.markdown)
    failed = sum(len(stats.failures) for by_engine in results.values() for stats, _ in by_engine.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
