"""Measurements: one request (``Sample``), one execution of a workload (``Run``), an arm's pooled runs
(``Stats``), and the resident-memory sampler (``PeakRSS``)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import numpy as np
import psutil


@dataclass
class Sample:
    """One request: latency from its (scheduled) arrival, and arrival -> first denoising step done."""

    latency_s: float
    first_step_s: float | None


@dataclass
class Run:
    """One execution of a workload by one arm."""

    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    makespan_s: float = 0.0  # first arrival -> last completion
    peak_rss: int = 0
    gpu_peak: int | None = None  # highest allocated GPU bytes seen during the run
    gpu_max_cumulative: int | None = None  # server arms: max allocated since the server started


@dataclass
class Stats:
    """A workload's runs (all repeats) of one arm, pooled."""

    arm: str
    runs: list[Run]

    @property
    def samples(self) -> list[Sample]:
        return [s for r in self.runs for s in r.samples]

    @property
    def failures(self) -> list[str]:
        return [f for r in self.runs for f in r.failures]

    @property
    def throughput(self) -> float:
        """Images per second: completed images over the summed makespans."""
        span = sum(r.makespan_s for r in self.runs)
        return len(self.samples) / span if span > 0 else float("nan")

    def latency(self, q: float | None = None) -> float:
        values = [s.latency_s for s in self.samples]
        if not values:
            return float("nan")
        return float(np.mean(values)) if q is None else float(np.percentile(values, q))

    def first_step(self, q: float | None = None) -> float:
        values = [s.first_step_s for s in self.samples if s.first_step_s is not None]
        if not values:
            return float("nan")
        return float(np.mean(values)) if q is None else float(np.percentile(values, q))

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)

    @property
    def gpu_peak(self) -> int | None:
        values = [r.gpu_peak for r in self.runs if r.gpu_peak is not None]
        return max(values) if values else None

    @property
    def gpu_max_cumulative(self) -> int | None:
        values = [r.gpu_max_cumulative for r in self.runs if r.gpu_max_cumulative is not None]
        return max(values) if values else None


class PeakRSS:
    """Samples the resident memory of a process and its children in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05, children: bool = True) -> None:
        self.pid = pid
        self.children = children
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        try:
            proc = psutil.Process(self.pid)
            procs = [proc, *(proc.children(recursive=True) if self.children else [])]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak = max(self.peak, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
