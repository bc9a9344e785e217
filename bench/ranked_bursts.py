#!/usr/bin/env python
"""Who finishes when: bursts of K requests at once on server arms, interleaved, the latency by finishing rank.

A burst's mean latency hides its shape: two engines with the same makespan can finish their first requests at
different times (the step engine's decodes time-sharing the cores with its loops did that, bench/RESULTS.md).
This prints, per arm, the mean over the rounds of the 1st, 2nd, ... K-th request to finish, the mean latency and
the makespan; the arms take turns round by round, so a shared machine's drift falls on all of them alike.

Example: ``python bench/ranked_bursts.py --size 512 --burst 4 --rounds 8 --markdown bench/RESULTS.md``
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import httpx  # noqa: E402
from benchlib.arms import ServerArm  # noqa: E402
from benchlib.common import log, publish  # noqa: E402

NATIVE = "/api/diffusers/inference"


async def burst(url: str, args: argparse.Namespace, seed: int) -> tuple[list[float], float]:
    """One burst of ``args.burst`` requests at once: their latencies, sorted, and the makespan."""

    async def one(client: httpx.AsyncClient, i: int) -> float:
        body = {"prompt": args.prompt, "num_inference_steps": args.steps, "height": args.size, "width": args.size}
        sent = time.perf_counter()
        response = await client.post(NATIVE, json={**body, "seed": seed + i})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return time.perf_counter() - sent

    async with httpx.AsyncClient(base_url=url, timeout=None, trust_env=False) as client:
        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(client, i) for i in range(args.burst)))
        return sorted(latencies), time.perf_counter() - started


def report(args: argparse.Namespace, argv: list[str], results: dict[str, list[tuple[list[float], float]]]) -> str:
    ranks = " | ".join(f"{k + 1}." for k in range(args.burst))
    lines = [f"## Ranked bursts: {args.model}, {args.size}x{args.size}, {args.steps} steps, bursts of {args.burst}", ""]
    lines += ["```", "python " + shlex.join(["bench/ranked_bursts.py", *argv]), "```", ""]
    lines += [f"{args.rounds} rounds, the arms in turn; seconds, mean over the rounds.", ""]
    lines += [f"| arm | mean | {ranks} | makespan |", "|---|---:|" + "---:|" * args.burst + "---:|"]
    means: dict[str, float] = {}
    for name, runs in results.items():
        by_rank = [statistics.mean(run[0][k] for run in runs) for k in range(args.burst)]
        means[name] = statistics.mean(statistics.mean(run[0]) for run in runs)
        span = statistics.mean(run[1] for run in runs)
        lines.append(f"| {name} | {means[name]:.3f} | " + " | ".join(f"{v:.3f}" for v in by_rank) + f" | {span:.3f} |")
    if len(means) > 1:
        first, *others = list(means)
        lines += [""] + [f"- mean latency {other}/{first}: {means[other] / means[first]:.2f}x" for other in others]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--burst", type=int, default=4, help="requests at once")
    parser.add_argument("--rounds", type=int, default=8, help="bursts per arm")
    parser.add_argument("--arms", type=lambda t: t.split(","), default=["threads", "step"], help="engines")
    parser.add_argument("--warmup-burst", type=int, default=16, help="an unmeasured burst per arm after loading")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.burst < 1 or args.rounds < 1 or args.warmup_burst < 0:
        parser.error("--burst and --rounds must be >= 1, --warmup-burst >= 0")
    # What ServerArm reads of the options (the same server flags as bench/bench.py gives).
    args.warmup, args.load_timeout, args.keep_logs = 2, 900.0, False
    args.prompt = "a photo of an astronaut riding a horse on the beach"
    arms = {name: ServerArm(name, args, ["--engine", name]) for name in args.arms}
    results: dict[str, list[tuple[list[float], float]]] = {name: [] for name in arms}
    try:
        for arm in arms.values():
            arm.start()
        for round_ in range(args.rounds):
            for name, arm in arms.items():
                log(f"{name}: round {round_ + 1}/{args.rounds}")
                results[name].append(asyncio.run(burst(arm.url, args, 1000 * (round_ + 1))))
    finally:
        for arm in arms.values():
            arm.stop()
    publish(report(args, sys.argv[1:] if argv is None else argv, results), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
