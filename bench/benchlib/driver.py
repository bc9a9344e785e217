"""The driver: every workload on every arm, interleaved or one arm after another."""

from __future__ import annotations

import argparse

from .arms import Arm, SerialArm, ServerArm, make_arm
from .common import log
from .options import estimate_flops
from .report import Report
from .stats import Run
from .workloads import Seeds, Workload


def run_workload(arm: Arm, workload: Workload, repeat: int, args: argparse.Namespace, seeds: Seeds) -> Run:
    log(f"{arm.name}: {workload.label}, repeat {repeat + 1}/{args.repeats}")
    run = arm.run(workload.offsets(repeat, args.seed), seeds.take(workload, repeat))
    if run.failures:
        log(f"{arm.name}: {len(run.failures)} failed request(s), first: {run.failures[0]}")
    return run


def capacity_of(report: Report, bursts: list[Workload]) -> tuple[float, str]:
    """Serial capacity (images/s) from the largest burst; another arm's if serial did not run."""
    largest = max(bursts, key=lambda w: w.value).label
    for arm in ("serial", "serial-opt", "ours", "thread"):
        stats = report.results.get(largest, {}).get(arm)
        if stats is not None and stats.samples:
            return stats.throughput, arm
    raise RuntimeError("no burst completed: cannot set the Poisson rates")


def benchmark(args: argparse.Namespace, report: Report) -> None:
    import torch

    from utils.random_models import is_random_preset

    seeds = Seeds(args.seed * 1000)
    bursts = [Workload("burst", n, n) for n in args.bursts]
    # Interleaving arms per workload spreads a shared machine's load drift evenly over the arms; it keeps every
    # server loaded at once, so on a GPU (memory) the arms run one after another instead.
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    interleave = not on_cuda if args.interleave == "auto" else args.interleave == "yes"
    arms: dict[str, Arm] = {}

    def started(name: str) -> Arm:
        if name not in arms:
            arm = make_arm(name, args)
            arm.start()
            arms[name] = arm
            report.idle[name] = arm.idle
            if isinstance(arm, ServerArm):
                report.servers[name] = arm.describe()
            if isinstance(arm, SerialArm):
                report.applied = report.applied or arm.applied
                if report.flops is None:
                    report.flops = estimate_flops(arm.pipe, args.size, args.steps)
        return arms[name]

    def poisson() -> list[Workload]:
        if report.capacity is None:
            report.capacity, report.capacity_from = capacity_of(report, bursts)
        return [Workload("poisson", f, args.poisson_requests, f * report.capacity) for f in args.poisson_rates]

    if not any(name.startswith("serial") for name in report.arms) and is_random_preset(args.model):
        from utils.random_models import build_random_pipeline

        report.flops = estimate_flops(build_random_pipeline(args.model, device="meta"), args.size, args.steps)
    try:
        if interleave:
            for name in report.arms:
                started(name)
            for workload in bursts:
                for repeat in range(args.repeats):
                    for name in report.arms:
                        report.add(workload, name, run_workload(arms[name], workload, repeat, args, seeds))
            for workload in poisson() if args.poisson_rates else []:
                for repeat in range(args.repeats):
                    for name in report.arms:
                        report.add(workload, name, run_workload(arms[name], workload, repeat, args, seeds))
        else:
            for name in report.arms:
                arm = started(name)
                for workload in bursts:
                    for repeat in range(args.repeats):
                        report.add(workload, name, run_workload(arm, workload, repeat, args, seeds))
                for workload in poisson() if args.poisson_rates else []:
                    for repeat in range(args.repeats):
                        report.add(workload, name, run_workload(arm, workload, repeat, args, seeds))
                arm.stop()
                del arms[name]
    finally:
        for arm in arms.values():
            arm.stop()
