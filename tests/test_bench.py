"""bench/bench.py: a tiny end-to-end run of all three arms, and the fused-QKV option. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "bench.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_script", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_bench()


@pytest.mark.slow
def test_smoke_run_prints_all_three_arms_and_exits_0(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    command = [
        sys.executable,
        str(BENCH),
        "--bursts",
        "1,2",
        "--steps",
        "2",
        "--size",
        "64",
        "--poisson-rates",
        "0.5",
        "--poisson-requests",
        "3",
        "--warmup",
        "1",
        "--markdown",
        str(report),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for title in ("### burst N=1", "### burst N=2", "### poisson 0.5x capacity", "### Summary"):
        assert title in out
    for arm in ("serial", "thread", "ours"):
        assert f"| {arm} |" in out
    assert "ours/thread images/s" in out and "ours/serial images/s" in out and "ours/thread mean latency" in out
    # The Markdown file gets the same report, with the exact command and the machine.
    written = report.read_text()
    assert "bench/bench.py --bursts 1,2 --steps 2 --size 64" in written
    assert "torch:" in written and "logical CPUs" in written and "device: cpu" in written


def test_bad_arguments_exit_2() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--arms", "serial,bogus"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown arm" in done.stderr


def test_poisson_arrivals_are_reproducible(bench: ModuleType) -> None:
    workload = bench.Workload("poisson", 0.5, 20, rate=4.0)
    first, again = workload.offsets(0, seed=7), workload.offsets(0, seed=7)
    assert first == again and first[0] == 0.0 and first == sorted(first)
    assert workload.offsets(1, seed=7) != first  # every repeat draws its own arrivals
    assert bench.Workload("burst", 4, 4).offsets(0, seed=7) == [0.0] * 4


def test_gpu_report_shows_memory_the_floor_and_the_targets(bench: ModuleType) -> None:
    """The CUDA-only parts of the report, from synthetic measurements (no GPU needed)."""
    args = bench.parse_args(["--model", "random:sd3.5-medium", "--size", "1024", "--steps", "28", "--bursts", "16"])
    report = bench.Report(args=args, command="python bench/bench.py ...", arms=["serial", "thread", "ours"])
    gib = 1 << 30
    report.idle = {arm: {"rss": 3 * gib, "gpu_allocated": 16 * gib} for arm in report.arms}
    report.flops = 645.5e12
    burst = bench.Workload("burst", 16, 16)

    def run(per_image: float, latencies: list[float], gpu_peak: int) -> Any:
        samples = [bench.Sample(latency, latency / 2) for latency in latencies]
        return bench.Run(samples, [], per_image * 16, 4 * gib, gpu_peak, gpu_peak)

    fifo = [1.6 * (i + 1) for i in range(16)]  # FIFO: request i done at i x S
    report.add(burst, "serial", run(1.6, fifo, 20 * gib))
    report.add(burst, "thread", run(1.7, [1.7 * 16] * 16, 60 * gib))  # processor sharing: all done at the end
    report.add(burst, "ours", run(1.6, fifo, 24 * gib))
    text = bench.render(report)
    assert "GPU peak alloc" in text and "| idle after warm-up | 16.00 GiB | 16.00 GiB | 16.00 GiB |" in text
    assert "| burst N=16 | 20.00 GiB | 60.00 GiB | 24.00 GiB |" in text
    assert "645.5 TFLOP at 800 TFLOP/s = 0.807 s" in text
    assert "| burst N=16 | 1.6 (50%) | 1.7 (47%) | 1.6 (50%) |" in text
    assert "| burst N=16 | 1.06x | 1.00x | 0.50x |" in text and "| yes |" in text


def _image(pipe: Any, seed: int) -> np.ndarray:
    out = pipe("a red bicycle", num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images


@pytest.mark.slow
def test_fused_qkv_gives_the_same_images_and_stays_safe_under_concurrency(bench: ModuleType) -> None:
    from Pipelines import TextToImagePipelineSD3
    from utils import RequestScopedPipeline

    # A private pipeline: fusing changes the transformer, and the session's tiny one is shared.
    pipe = TextToImagePipelineSD3("random:tiny", device="cpu").start().pipeline
    expected = {seed: _image(pipe, seed) for seed in (1, 2, 3, 4)}
    weights = sum(p.numel() for p in pipe.transformer.parameters())

    # random:tiny has SD3.5's qk RMSNorm and an MMDiT-X self-attention (attn2): both must survive fusing.
    assert bench.fuse_qkv(pipe.transformer) == 3
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn.to_qkv is not None and block.attn.to_added_qkv is not None and block.attn2.to_qkv is not None
    assert not hasattr(block.attn, "to_q") and not hasattr(block.attn, "add_q_proj")
    assert sum(p.numel() for p in pipe.transformer.parameters()) == weights  # the weights are held once

    np.testing.assert_allclose(_image(pipe, 1), expected[1], atol=1e-5)
    scoped = RequestScopedPipeline(pipe)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            results[seed] = _image(scoped.generate, seed)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for seed, image in expected.items():
        np.testing.assert_allclose(results[seed], image, atol=1e-5)


def test_flop_estimate_matches_the_issue_for_sd35_medium(bench: ModuleType) -> None:
    """About 646 TFLOP per 1024x1024 image at 28 steps, counted on the meta device (nothing allocated)."""
    from models.random_build import build_random_pipeline

    pipe = build_random_pipeline("random:sd3.5-medium", device="meta", dtype=torch.bfloat16)
    flops = bench.estimate_flops(pipe, 1024, 28)
    assert flops is not None
    assert 620e12 < flops < 670e12


def test_memory_script_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memory.py"), "--layers", "2", "--concurrency", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| concurrent requests | peak RSS growth |" in result.stdout
    assert "\n| 2 | " in result.stdout


def test_the_step_arm_is_the_server_with_the_step_engine(bench: ModuleType) -> None:
    arm = bench.make_arm("step", bench.parse_args(["--arms", "ours,step"]))
    assert isinstance(arm, bench.ServerArm) and arm.extra == ["--engine", "step"]


@pytest.mark.slow
def test_step_workloads_smoke_run_prints_both_workloads(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    command = [sys.executable, str(REPO / "bench" / "step_workloads.py"), "--arms", "step", "--steps", "2"]
    command += ["--sizes", "32,64", "--burst", "4", "--markdown", str(report)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (
        "mixed burst of 4 (32/64)" in done.stdout and "late arrival while 8 generate: first step after" in done.stdout
    )
    assert "--engine step" in report.read_text()


@pytest.mark.slow
def test_the_engines_comparison_runs_both_engines_at_every_size_and_sums_them_up(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--arms", "threads,step", "--sizes", "32,64", "--bursts", "2"]
    command += [
        "--steps",
        "2",
        "--poisson-rates",
        "0.8",
        "--poisson-requests",
        "2",
        "--warmup",
        "1",
        "--warmup-burst",
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.count("## Run ") == 2 and "random:tiny, 32x32" in out and "random:tiny, 64x64" in out
    assert "threads server: `python serverasync.py" in out and "--engine threads" in out and "--engine step" in out
    summary = out.split("## Engines: step against threads", 1)[1]
    rows = [line for line in summary.splitlines() if line.startswith("| random:tiny")]
    assert len(rows) == 4, summary  # two sizes x (one burst + one Poisson load)
    assert all(row.count("x |") >= 4 and ("yes (" in row or "no (" in row) for row in rows), rows
    # Each size's step server's pass-time table, as /api/status showed it at the end of its run.
    for size in (32, 64):
        table = summary.split(f"### Pass times: step server, random:tiny {size}x{size}", 1)[1].split("###", 1)[0]
        assert "loop(s) of" in table and f"| {size}x{size} | " in table and "**knee**" in table, table
