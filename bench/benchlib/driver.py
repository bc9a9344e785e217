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
    """Serial capacity (images/s) from the largest burst; another arm's if serial did not run (the engines'
    comparison: the threads engine's)."""
    largest = max(bursts, key=lambda w: w.value).label
    for arm in ("serial", "serial-opt", "ours", "threads", "thread", "step"):
        stats = report.results.get(largest, {}).get(arm)
        if stats is not None and stats.samples:
            return stats.throughput, arm
    raise RuntimeError("no burst completed: cannot set the Poisson rates")


class Driver:
    """Starts the arms as needed and runs every workload on them, into a report."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        import torch

        self.args = args
        self.report = report
        self.seeds = Seeds(args.seed * 1000)
        self.bursts = [Workload("burst", n, n) for n in args.bursts]
        # Interleaving arms per workload spreads a shared machine's load drift evenly over the arms; it keeps every
        # server loaded at once, so on a GPU (memory) the arms run one after another instead.
        on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        self.interleave = not on_cuda if args.interleave == "auto" else args.interleave == "yes"
        self.arms: dict[str, Arm] = {}

    def started(self, name: str) -> Arm:
        args, report = self.args, self.report
        if name not in self.arms:
            arm = make_arm(name, args)
            arm.start()
            self.arms[name] = arm
            report.idle[name] = arm.idle
            if isinstance(arm, ServerArm):
                report.servers[name] = arm.describe()
            if isinstance(arm, SerialArm):
                report.applied = report.applied or arm.applied
                if report.flops is None:
                    report.flops = estimate_flops(arm.pipe, args.size, args.steps)
        return self.arms[name]

    def keep_batching(self, name: str) -> None:
        """A step server's batching figures (its loops and pass-time table) as they are at the end, for the report."""
        arm = self.arms[name]
        if isinstance(arm, ServerArm) and name not in self.report.batching:
            batching = arm.batching()
            if batching:
                self.report.batching[name] = batching

    def poisson(self) -> list[Workload]:
        """The Poisson workloads, none without rates; their rates come from the bursts measured so far."""
        if not self.args.poisson_rates:
            return []
        report, requests = self.report, self.args.poisson_requests
        if report.capacity is None:
            report.capacity, report.capacity_from = capacity_of(report, self.bursts)
        return [Workload("poisson", f, requests, f * report.capacity) for f in self.args.poisson_rates]

    def measure(self, names: list[str], workloads: list[Workload]) -> None:
        """Every workload, every repeat, on each of the named (started) arms in turn."""
        for workload in workloads:
            for repeat in range(self.args.repeats):
                for name in names:
                    run = run_workload(self.arms[name], workload, repeat, self.args, self.seeds)
                    self.report.add(workload, name, run)

    def run(self) -> None:
        from models.random_build import is_random_preset

        args = self.args
        if not any(name.startswith("serial") for name in self.report.arms) and is_random_preset(args.model):
            from models.random_build import build_random_pipeline

            self.report.flops = estimate_flops(build_random_pipeline(args.model, device="meta"), args.size, args.steps)
        try:
            if self.interleave:
                for name in self.report.arms:
                    self.started(name)
                self.measure(self.report.arms, self.bursts)
                self.measure(self.report.arms, self.poisson())
            else:
                for name in self.report.arms:
                    self.started(name)
                    self.measure([name], self.bursts)
                    self.measure([name], self.poisson())
                    self.keep_batching(name)
                    self.arms[name].stop()
                    del self.arms[name]
        finally:
            for name, arm in self.arms.items():
                self.keep_batching(name)
                arm.stop()


def benchmark(args: argparse.Namespace, report: Report) -> None:
    Driver(args, report).run()
