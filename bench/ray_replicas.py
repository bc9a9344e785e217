"""Throughput of 1 replica against N replicas on Ray Serve (deploy/ray_serve.py), in one run.

Each configuration is the script form (``python deploy/ray_serve.py``) on a free loopback port: started, warmed up,
sent the same bursts (every request at the same instant, its own seed), then stopped with SIGTERM. Prints a
Markdown table with the ratio of each configuration's images/s to the first one's. Asserts nothing about timings.

    python bench/ray_replicas.py --replicas 1,2 --burst 24 --steps 20 --size 128
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(replicas: int, args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = tmp / f"replicas-{replicas}.log"
    command = [
        sys.executable,
        str(REPO / "deploy" / "ray_serve.py"),
        *("--model", args.model, "--num-replicas", str(replicas), "--num-cpus", str(args.num_cpus)),
        *("--host", "127.0.0.1", "--port", str(port), "--image-dir", str(tmp / "images")),
        *("--request-timeout", "0", "--log-level", "warning", *args.server_args),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "deploy.ray_serve: serving" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{replicas} replica(s) did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}", log


def burst(url: str, n: int, args: argparse.Namespace, seed0: int) -> tuple[float, list[float], Counter[str]]:
    """Send ``n`` requests at once; return the wall time, each latency and which replica answered each."""

    def one(i: int) -> tuple[float, str]:
        body = {"prompt": f"a lighthouse {i}", "seed": seed0 + i, "num_inference_steps": args.steps}
        body.update(height=args.size, width=args.size)
        began = time.perf_counter()
        response = httpx.post(f"{url}/api/diffusers/inference", json=body, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - began, response.headers.get("x-replica", "?")

    began = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    return time.perf_counter() - began, [r[0] for r in results], Counter(r[1] for r in results)


def measure(replicas: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    proc, url, _ = start(replicas, args, tmp)
    try:
        burst(url, 2 * replicas, args, seed0=10_000)  # warm-up: every replica's first call
        rates, latencies, spread = [], [], Counter[str]()
        for repeat in range(args.repeats):
            wall, times, answered = burst(url, args.burst, args, seed0=repeat * args.burst)
            rates.append(args.burst / wall)
            latencies += times
            spread += answered
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    latencies.sort()
    return {
        "replicas": replicas,
        "images_s": statistics.median(rates),
        "runs": rates,
        "mean": statistics.fmean(latencies),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
        "spread": sorted(spread.values(), reverse=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts, the first is the base")
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--burst", type=int, default=24, help="requests sent at once")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per configuration (the median is shown)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs Ray reserves per replica")
    parser.add_argument("server_args", nargs="*", help="after --: options for every replica (e.g. -- --max-queue 8)")
    args = parser.parse_args()
    counts = [int(c) for c in args.replicas.split(",")]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, args, Path(tmp)) for n in counts]
    base = rows[0]["images_s"]
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")
    print(
        f"- load average at start: {' '.join(f'{x:.2f}' for x in load_start)}; at end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"- {args.model}, {args.size}x{args.size}, {args.steps} steps, bursts of {args.burst}, {args.repeats} each\n")
    print("| replicas | images/s (median) | each burst | mean s | p95 s | answered per replica | ratio |")
    print("|---:|---:|---|---:|---:|---|---:|")
    for row in rows:
        runs = ", ".join(f"{r:.2f}" for r in row["runs"])
        spread = "/".join(str(s) for s in row["spread"])
        print(
            f"| {row['replicas']} | {row['images_s']:.2f} | {runs} | {row['mean']:.2f} | {row['p95']:.2f} "
            f"| {spread} | **{row['images_s'] / base:.2f}x** |"
        )


if __name__ == "__main__":
    main()
