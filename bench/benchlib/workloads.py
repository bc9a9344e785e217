"""Workloads: bursts of N simultaneous requests and open-loop Poisson arrivals; the seeds of their requests."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    kind: str  # "burst" or "poisson"
    value: float  # N, or the fraction of serial capacity
    requests: int
    rate: float | None = None  # arrivals per second (poisson)

    @property
    def label(self) -> str:
        if self.kind == "burst":
            return f"burst N={int(self.value)}"
        return f"poisson {self.value:g}x capacity ({self.rate:.3g} req/s, {self.requests} requests)"

    def offsets(self, repeat: int, seed: int) -> list[float]:
        """Arrival times in seconds from the start; the same for every arm (fixed seed per workload/repeat)."""
        if self.kind == "burst" or not self.rate:
            return [0.0] * self.requests
        rng = random.Random(seed * 1_000_003 + int(self.value * 1000) * 101 + repeat)
        times, now = [0.0], 0.0
        for _ in range(self.requests - 1):
            now += rng.expovariate(self.rate)
            times.append(now)
        return times


class Seeds:
    """A distinct generation seed for every request of a workload's repeat, the same ones for every arm."""

    def __init__(self, start: int) -> None:
        self.next = start
        self._given: dict[tuple[str, int], list[int]] = {}

    def take(self, workload: Workload, repeat: int) -> list[int]:
        key = (workload.label, repeat)
        if key not in self._given:
            self._given[key] = list(range(self.next, self.next + workload.requests))
            self.next += workload.requests
        return self._given[key]
