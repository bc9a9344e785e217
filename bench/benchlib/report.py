"""The report: the results collected by the driver (``Report``), the machine, and the Markdown tables."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .common import GIB, MIB
from .stats import Run, Stats
from .workloads import Workload

# Issue targets for a burst (ours vs the other arms); reported, never asserted.
TARGET_MIN_BURST = 16
TARGET_VS_THREAD_THROUGHPUT = 1.0
TARGET_VS_SERIAL_THROUGHPUT = 0.9
TARGET_VS_THREAD_LATENCY = 0.7


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
    batching: dict[str, dict] = field(default_factory=dict)  # step arm -> its /api/status engine.batching at the end
    elapsed_s: float = 0.0

    def add(self, workload: Workload, arm: str, run: Run) -> None:
        if workload.label not in self.results:
            self.results[workload.label] = {}
            self.workloads.append(workload)
        self.results[workload.label].setdefault(arm, Stats(arm, [])).runs.append(run)


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
    cuda = any(v.get("gpu_allocated") is not None for v in report.idle.values())
    out = render_header(report)
    summary: list[str] = []
    for workload in report.workloads:
        lines, row = render_workload(report, workload, cuda)
        out += lines
        summary.append(row)
    if summary and "ours" in report.arms:
        out += render_summary(summary)
    if report.flops and (cuda or report.args.peak_tflops):
        out += render_floor(report)
    if cuda:
        out += render_gpu_memory(report)
    return "\n".join(out)


def render_header(report: Report) -> list[str]:
    """The title, the command, the machine and the run's settings, and the idle memory of every arm."""
    args = report.args
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
    return out


def render_workload(report: Report, workload: Workload, cuda: bool) -> tuple[list[str], str]:
    """One workload's table and ratios, and its row of the summary table."""
    by_arm = report.results[workload.label]
    out = [f"### {workload.label}", ""]
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
    ratios = workload_ratios(by_arm)
    shown = {k: v for k, v in ratios.items() if v != "n/a"}
    out.append("")
    if shown:
        out.append("Ratios: " + ", ".join(f"{k} **{v}**" for k, v in shown.items()))
        out.append("")
    summary = (
        f"| {workload.label} | {ratios['ours/thread images/s']} | {ratios['ours/serial images/s']} | "
        f"{ratios['ours/thread mean latency']} | {ratios['ours/thread first step']} | "
        f"{burst_verdict(workload, by_arm) or '-'} |"
    )
    return out, summary


def workload_ratios(by_arm: dict[str, Stats]) -> dict[str, str]:
    """ours against thread and serial (and serial-opt against serial), "n/a" where an arm is missing."""
    ours, thread, serial = by_arm.get("ours"), by_arm.get("thread"), by_arm.get("serial")
    ratios = {
        "ours/thread images/s": fmt_ratio(ours.throughput, thread.throughput) if ours and thread else "n/a",
        "ours/serial images/s": fmt_ratio(ours.throughput, serial.throughput) if ours and serial else "n/a",
        "ours/thread mean latency": fmt_ratio(ours.latency(), thread.latency()) if ours and thread else "n/a",
        "ours/thread first step": fmt_ratio(ours.first_step(), thread.first_step()) if ours and thread else "n/a",
    }
    if serial and by_arm.get("serial-opt"):
        ratios["serial-opt/serial images/s"] = fmt_ratio(by_arm["serial-opt"].throughput, serial.throughput)
    step, compiled = by_arm.get("step"), by_arm.get("step-compile")
    if step and ours:
        ratios["step/ours images/s"] = fmt_ratio(step.throughput, ours.throughput)
    if step and compiled:
        ratios["step-compile/step images/s"] = fmt_ratio(compiled.throughput, step.throughput)
    return ratios


def burst_verdict(workload: Workload, by_arm: dict[str, Stats]) -> str:
    """Whether ours met the burst targets ("yes", "no"); "" unless a large enough burst ran ours, thread, serial."""
    ours, thread, serial = by_arm.get("ours"), by_arm.get("thread"), by_arm.get("serial")
    if not (workload.kind == "burst" and workload.value >= TARGET_MIN_BURST and ours and thread and serial):
        return ""
    met = (
        ours.throughput >= TARGET_VS_THREAD_THROUGHPUT * thread.throughput
        and ours.throughput >= TARGET_VS_SERIAL_THROUGHPUT * serial.throughput
        and ours.latency() <= TARGET_VS_THREAD_LATENCY * thread.latency()
    )
    return "yes" if met else "no"


def render_summary(summary: list[str]) -> list[str]:
    """The summary table: one row per workload (from ``render_workload``), under the targets."""
    out = ["### Summary: ours against the other arms", ""]
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
    return out


def render_floor(report: Report) -> list[str]:
    """Seconds per image of every arm on every burst, against the FLOP floor at the device's peak."""
    peak = report.args.peak_tflops or 800.0
    floor = report.flops / (peak * 1e12)
    out = [
        f"### Seconds per image against the floor ({report.flops / 1e12:.4g} TFLOP at {peak:g} TFLOP/s "
        f"= {floor:.3g} s)",
        "",
    ]
    out.append("| workload | " + " | ".join(f"{arm} s/image (share of peak)" for arm in report.arms) + " |")
    out.append("|---|" + "---:|" * len(report.arms))

    def cell(stats: Stats | None) -> str:
        if stats is None or not stats.samples:
            return "-"
        per_image = 1 / stats.throughput
        return f"{per_image:.3g} ({floor / per_image:.0%})"

    out += burst_rows(report, cell)
    out.append("")
    return out


def render_gpu_memory(report: Report) -> list[str]:
    """Peak GPU memory of every arm on every burst, next to the idle figure."""
    # One copy of the weights is the idle figure; the growth with N is the requests' activations.
    out = ["### GPU memory against concurrency (peak allocated; idle = the weights, held once)", ""]
    idle_cells = [fmt_gib(report.idle.get(arm, {}).get("gpu_allocated")) for arm in report.arms]
    out.append("| workload | " + " | ".join(report.arms) + " |")
    out.append("|---|" + "---:|" * len(report.arms))
    out.append("| idle after warm-up | " + " | ".join(idle_cells) + " |")
    out += burst_rows(report, lambda stats: fmt_gib(stats.gpu_peak if stats else None))
    out.append("")
    return out


def burst_rows(report: Report, cell: Callable[[Stats | None], str]) -> list[str]:
    """One table row per burst: one cell per arm, from its stats (None where the arm did not run)."""
    rows = []
    for workload in report.workloads:
        if workload.kind != "burst":
            continue
        by_arm = report.results[workload.label]
        rows.append(f"| {workload.label} | " + " | ".join(cell(by_arm.get(arm)) for arm in report.arms) + " |")
    return rows
