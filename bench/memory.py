"""Resident memory under concurrent requests: request-scoped views share the weights.

Builds the tiny random SD3 with a larger transformer (about 0.9 GB of fp32 weights, so that one copy would stand
out), then runs N concurrent requests through ``RequestScopedPipeline`` on real threads and prints the peak RSS
growth over the idle process against the size of the weights. Short T5 prompts and no CFG keep the activations
small: what is measured is whether weights get duplicated.

    python bench/memory.py --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import torch  # noqa: E402


def build(layers: int, tiny: Any | None = None) -> tuple[Any, int]:
    """The tiny pipeline (built here unless given) with a transformer of `layers` 512-wide layers; returns it and
    its weight bytes."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from Pipelines import TextToImagePipelineSD3

    if tiny is None:
        tiny = TextToImagePipelineSD3("random:tiny", device="cpu").start().pipeline
    config = dict(tiny.transformer.config)
    config.update(num_layers=layers, num_attention_heads=8, attention_head_dim=64, caption_projection_dim=512)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel.from_config(config)
    pipe = StableDiffusion3Pipeline(**{**tiny.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe, sum(p.numel() * p.element_size() for p in transformer.parameters())


def peak_growth(scoped: Any, n: int) -> tuple[int, dict[int, BaseException]]:
    """Peak RSS growth (bytes) while n requests run at once on n threads, and the requests' errors by index."""
    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    barrier = threading.Barrier(n)
    errors: dict[int, BaseException] = {}

    def request(i: int) -> None:
        barrier.wait()
        try:
            # Short T5 prompts and no CFG keep the activations small next to the weights.
            scoped.generate(
                f"request {i}",
                num_inference_steps=2,
                height=64,
                width=64,
                guidance_scale=1.0,
                max_sequence_length=16,
                generator=torch.Generator().manual_seed(i),
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors[i] = exc

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=request, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    sampler.join()
    return peak - baseline, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated request counts")
    parser.add_argument("--layers", type=int, default=24, help="transformer layers (24: about 0.9 GB)")
    args = parser.parse_args()
    counts = [int(c) for c in args.concurrency.split(",") if c]

    from utils import RequestScopedPipeline

    pipe, weights = build(args.layers)
    scoped = RequestScopedPipeline(pipe)
    peak_growth(scoped, 1)  # warm-up: first-call allocations are not per-request growth
    print(f"transformer weights: {weights / 2**20:.0f} MiB; torch {torch.__version__}")
    print()
    print("| concurrent requests | peak RSS growth | growth / one copy of the weights |")
    print("|---:|---:|---:|")
    for n in counts:
        growth, errors = peak_growth(scoped, n)
        if errors:
            raise RuntimeError(f"{len(errors)} request(s) failed: {next(iter(errors.values()))!r}")
        print(f"| {n} | {growth / 2**20:.0f} MiB | {growth / weights:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
