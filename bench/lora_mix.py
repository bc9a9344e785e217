#!/usr/bin/env python
"""A mixed LoRA-adapter workload on both engines, over HTTP (see bench/README.md).

Three bursts of ``--burst`` requests on each engine's server (``--engine threads`` and ``--engine step``, each
with the same random adapters, made here with peft on the tiny model and saved in diffusers' format):

- ``none``: no request names an adapter (the baseline);
- ``one``: every request names the same adapter (one set: batched and stepped side by side as without adapters);
- ``mixed``: the requests cycle through four sets (none, a, b, a+b), the case where sets must take turns.

Printed: images/s and mean latency per burst and engine, and each burst's images/s against ``none`` on the same
engine. Example: ``python bench/lora_mix.py --burst 8 --steps 10 --markdown bench/RESULTS.md``
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, str(Path(BENCH_DIR).parent))  # the repository: models, Pipelines
sys.path.insert(2, str(Path(BENCH_DIR).parent / "tests"))  # lora_helpers: the tests' adapter maker

import httpx  # noqa: E402
from benchlib.arms import ServerArm  # noqa: E402
from benchlib.common import log, publish  # noqa: E402

NATIVE = "/api/diffusers/inference"
ENGINES = ("threads", "step")
SETS: dict[str, list[list[dict[str, Any]]]] = {
    "none": [[]],
    "one": [[{"name": "a", "scale": 1.0}]],
    "mixed": [[], [{"name": "a", "scale": 1.0}], [{"name": "b", "scale": 1.0}], [{"name": "a"}, {"name": "b"}]],
}


async def burst(url: str, args: argparse.Namespace, sets: list[list[dict[str, Any]]]) -> dict[str, float]:
    async def one(i: int) -> float:
        body = {"prompt": f"{args.prompt} {i}", "num_inference_steps": args.steps, "seed": i}
        body.update(height=args.size, width=args.size, loras=sets[i % len(sets)])
        sent = time.perf_counter()
        response = await client.post(NATIVE, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return time.perf_counter() - sent

    async with httpx.AsyncClient(base_url=url, timeout=None, trust_env=False) as client:
        await one(0)  # warm: loads and switches once before the clock starts
        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(args.burst)))
        makespan = time.perf_counter() - started
    return {"images/s": args.burst / makespan, "mean s": statistics.mean(latencies)}


def make_adapters(folder: Path) -> list[str]:
    from lora_helpers import make_adapter

    return [f"{name}={make_adapter(folder / name, seed=seed)}" for name, seed in (("a", 1), ("b", 2))]


def run(args: argparse.Namespace) -> list[str]:
    lines = ["| engine | burst | images/s | vs none | mean s |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench-loras-") as tmp:
        flags = [f for spec in make_adapters(Path(tmp)) for f in ("--lora", spec)]
        for engine in ENGINES:
            arm = ServerArm(engine, args, ["--engine", engine, *flags])
            arm.start()
            try:
                results = {}
                for name, sets in SETS.items():
                    log(f"{engine}: {name}")
                    results[name] = asyncio.run(burst(arm.url, args, sets))
            finally:
                arm.stop()
            base = results["none"]["images/s"]
            for name, result in results.items():
                lines.append(
                    f"| {engine} | {name} | {result['images/s']:.3f} | {result['images/s'] / base:.2f}x | "
                    f"{result['mean s']:.3f} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny", help="random:tiny (the adapters are made for its shapes)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    # What ServerArm reads of the options (the same server flags as bench/bench.py gives).
    args.device, args.dtype, args.warmup, args.load_timeout, args.keep_logs = None, None, 1, 900.0, False
    args.prompt = "a photo of an astronaut riding a horse on the beach"
    header = [f"## LoRA adapters, mixed sets: {args.model}, {args.size}x{args.size}, {args.steps} steps", ""]
    header += ["```", "python " + shlex.join(["bench/lora_mix.py", *(sys.argv[1:] if argv is None else argv)])]
    header += ["```", ""]
    text = "\n".join(header + run(args))
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
