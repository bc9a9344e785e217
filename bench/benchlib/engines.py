"""The engines' comparison (issue 21): the step engine against the threads engine, on several workloads in one run.

``bench/bench.py --arms threads,step --sizes 128,512`` runs every workload (bursts, Poisson) at each size, one
report per size (the compute-bound case is the tiny model at 512x512: 1,024 image tokens per sample), then this
summary: per size and workload, step/threads images/s, mean and p95 latency and time to first step, and whether
the targets are met; then each step server's pass-time table as it stood at the end of its size's run (its loops,
what the calibration measured for each count of loops, and per image size the time of a pass per batch size and
the knee), which says why a target is or is not met. Reported, never asserted: a shared machine's numbers are
noisy, compare within one run.
"""

from __future__ import annotations

from typing import Any

from .report import Report, fmt_ratio
from .stats import Stats

__all__ = ["TARGET_STEP_BURST16_THROUGHPUT", "TARGET_STEP_LATENCY", "TARGET_STEP_THROUGHPUT", "render_engines"]

TARGET_STEP_THROUGHPUT = 1.0  # step/threads images/s, every workload
TARGET_STEP_LATENCY = 1.0  # step/threads mean latency, every workload
TARGET_STEP_BURST16_THROUGHPUT = 1.2  # step/threads images/s, random:tiny at 128x128, bursts of 16 or more
BURST16 = 16


def _verdict(report: Report, kind: str, value: float, step: Stats, threads: Stats) -> str:
    throughput = TARGET_STEP_THROUGHPUT
    if kind == "burst" and value >= BURST16 and report.args.model == "random:tiny" and report.args.size <= 128:
        throughput = TARGET_STEP_BURST16_THROUGHPUT
    met = step.throughput >= throughput * threads.throughput and step.latency() <= TARGET_STEP_LATENCY * (
        threads.latency()
    )
    return f"{'yes' if met else 'no'} (>= {throughput:g}x, <= {TARGET_STEP_LATENCY:g}x)"


def render_engines(reports: list[Report]) -> str:
    """The summary table over every size's report (rows without both engines are left out)."""
    out = ["## Engines: step against threads", ""]
    out.append(
        f"Targets (issue 21): step >= {TARGET_STEP_THROUGHPUT:g}x the threads engine's images/s and <= "
        f"{TARGET_STEP_LATENCY:g}x its mean latency on every workload; >= {TARGET_STEP_BURST16_THROUGHPUT:g}x "
        f"images/s on random:tiny (128x128) bursts of {BURST16}."
    )
    out.append("")
    out.append(
        "| workload | threads images/s | step images/s | step/threads images/s | mean latency | p95 latency | "
        "first step | targets met |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|:---:|")
    for report in reports:
        size = f"{report.args.model} {report.args.size}x{report.args.size}, {report.args.steps} steps"
        for workload in report.workloads:
            by_arm = report.results.get(workload.label, {})
            step, threads = by_arm.get("step"), by_arm.get("threads")
            if step is None or threads is None or not step.samples or not threads.samples:
                continue
            out.append(
                f"| {size}: {workload.label} | {threads.throughput:.3f} | {step.throughput:.3f} | "
                f"{fmt_ratio(step.throughput, threads.throughput)} | {fmt_ratio(step.latency(), threads.latency())} | "
                f"{fmt_ratio(step.latency(95), threads.latency(95))} | "
                f"{fmt_ratio(step.first_step(), threads.first_step())} | "
                f"{_verdict(report, workload.kind, workload.value, step, threads)} |"
            )
    out.append("")
    for report in reports:
        for arm, batching in report.batching.items():
            out += render_costs(f"{arm} server, {report.args.model} {report.args.size}x{report.args.size}", batching)
    return "\n".join(out)


def render_costs(title: str, batching: dict[str, Any]) -> list[str]:
    """One step server's loops and pass-time table (its /api/status ``engine.batching``)."""
    calibration = batching.get("calibration") or {}
    by_loops = ", ".join(f"{n} loop(s) {rate:g}" for n, rate in calibration.get("samples_per_s_by_loops", {}).items())
    out = [f"### Pass times: {title}", ""]
    out.append(
        f"{batching.get('loops')} loop(s) of {batching.get('threads_per_loop') or 'all'} thread(s); calibration "
        f"({calibration.get('seconds', 0):g} s), samples/s at the knee, all loops together: {by_loops or '-'}; "
        f"largest pass {batching.get('largest_pass')}, mean {batching.get('mean_pass', 0):.2f} samples."
    )
    out.append("")
    out.append("| image size | samples in a pass | ms per pass | samples/s | passes counted | knee |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for size, table in batching.get("costs", {}).items():
        for samples, cell in table["passes"].items():
            knee = "**knee**" if int(samples) == table["best_batch"] else ""
            out.append(
                f"| {size} | {samples} | {cell['ms']:.1f} | {cell['samples_per_s']:.1f} | {cell['counted']} | {knee} |"
            )
    out.append("")
    return out
