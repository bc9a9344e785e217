"""The step engine's start-up calibration: pass times of the loaded model, and how many loops the device wants.

It runs the loaded transformer on inputs of the real shapes (the encoded empty prompt, latents of the model's
default size) at 1, 2, 4, ... samples up to ``--max-batch-size``, one unmeasured pass then ``REPEATS`` measured
ones per size, the fastest of which goes into a ``CostModel`` (another process can only slow a pass down). The
sweep stops past the knee (the rate fell below the best by more than the model's tolerance), at an out-of-memory,
or when its time budget is spent (a large model on a CPU: the loops go on measuring online).

Loops (CPU): a CPU may do more with two single-threaded passes side by side than with one two-threaded pass (no
OpenMP barrier between the cores). So for every candidate count of loops (1, 2, 4, ... up to the cores, each loop
with an equal share of them) the sweep runs in that many threads at once, each with its share, and the count with
the most samples per second at its knee wins; among the counts within the tolerance of the best, the most loops,
as each loop's single-threaded share is the least disturbed by other work on the machine (no barrier waits on a
preempted thread), and at worst, one request a pass in each, it runs as the threads engine's one-core slots. The
candidates are measured in ``ROUNDS`` alternating rounds, each keeping its best, so that a burst of load from
elsewhere during one candidate's sweep does not decide. Passes are timed as the loops will time theirs
(``engine.costs.pass_clock``: one-thread loops by their thread's CPU time), so on a machine busy with other work
the one-thread candidates lose less to it than a candidate of more threads, which waits on its slowest thread: the
choice leans to more loops there, the safer one. On other devices there is one loop, and one sweep. The
threads that measure end with the calibration: a live thread that once ran torch keeps an OpenMP team, and more
OpenMP threads than cores slow every pass (bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .costs import CostModel, pass_clock
from .memory import is_oom, release_memory

logger = logging.getLogger(__name__)

__all__ = ["Calibration", "PassInputs", "calibrate", "loop_candidates"]

REPEATS = 3  # measured passes per size and thread, after one unmeasured; the fastest is recorded
ROUNDS = 2  # alternating sweeps of every candidate count of loops (one when there is one candidate)
BUDGET_S = 10.0  # measured seconds a sweep may spend; the loops go on measuring online


@dataclass
class PassInputs:
    """One sample's transformer inputs, repeated to any batch size (the values do not matter, the shapes do)."""

    latents: torch.Tensor  # [1, C, h, w]
    embeds: torch.Tensor  # [1, tokens, dim]
    pooled: torch.Tensor  # [1, dim]

    @property
    def group(self) -> Hashable:
        return tuple(self.latents.shape[-2:])  # as StepRunner groups its tracks

    def batch(self, size: int) -> dict[str, Any]:
        return {
            "hidden_states": self.latents.expand(size, *self.latents.shape[1:]).contiguous(),
            "timestep": torch.full((size,), 500.0, device=self.latents.device, dtype=self.latents.dtype),
            "encoder_hidden_states": self.embeds.expand(size, *self.embeds.shape[1:]).contiguous(),
            "pooled_projections": self.pooled.expand(size, *self.pooled.shape[1:]).contiguous(),
            "joint_attention_kwargs": None,
            "return_dict": False,
        }


@dataclass
class Calibration:
    """What the calibration found: the loops to run and their threads, and each candidate's best rate."""

    loops: int
    threads: int | None  # torch threads per loop (None: torch's setting)
    seconds: float
    candidates: dict[int, float] = field(default_factory=dict)  # loops -> samples/s at the knee, all loops together

    def to_dict(self) -> dict[str, Any]:
        return {
            "loops": self.loops,
            "threads_per_loop": self.threads,
            "seconds": round(self.seconds, 3),
            "samples_per_s_by_loops": {str(k): round(v, 2) for k, v in self.candidates.items()},
        }


def loop_candidates(cores: int | None) -> list[int]:
    """Counts of loops worth measuring: one on a GPU (``cores`` None), else 1, 2, 4, ... up to the cores."""
    if not cores:
        return [1]
    counts, n = [], 1
    while n <= cores:
        counts.append(n)
        n *= 2
    return counts


def _sizes(max_batch: int) -> list[int]:
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


def _timed(transformer: Any, inputs: dict[str, Any], clock: Callable[[], float]) -> float:
    started = clock()
    out = transformer(**inputs)[0]
    if out.is_cuda:
        torch.cuda.synchronize(out.device)  # the pass's time, not its launch's
    return clock() - started


class _Sweep:
    """``loops`` threads sweeping the sizes in step (a barrier per size), into one cost model."""

    def __init__(self, transformer: Any, inputs: PassInputs, costs: CostModel, loops: int, threads: int | None):
        self.transformer, self.inputs, self.costs = transformer, inputs, costs
        self.loops, self.threads = loops, threads
        self.sizes = _sizes(costs.max_batch)
        self.index = 0  # the size being measured; moved on by the barrier's action
        self.stop = False
        self.spent = 0.0  # measured seconds of the slowest thread so far
        self._spent_now = [0.0] * loops
        self._barrier = threading.Barrier(loops, action=self._next)

    def run(self) -> float:
        """Sweep; the samples per second of all loops together at the knee (0: nothing measured)."""
        workers = [threading.Thread(target=self._work, args=(i,), name=f"calibrate-{i}") for i in range(self.loops)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        group = self.inputs.group
        knee = self.costs.best_batch(group)
        return 0.0 if knee is None else self.loops * knee / (self.costs.pass_time(group, knee) or float("inf"))

    def _next(self) -> None:
        """Once every thread has measured the size: go on, or stop (past the knee, out of memory, budget)."""
        self.spent += max(self._spent_now)
        self._spent_now = [0.0] * self.loops
        rates = self.costs.rates(self.inputs.group)
        size = self.sizes[self.index]
        past_knee = size in rates and rates[size] < (1 - self.costs.tolerance) * max(rates.values())
        self.index += 1
        self.stop = self.stop or past_knee or self.spent > BUDGET_S or self.index == len(self.sizes)

    def _work(self, i: int) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.no_grad():
            while not self.stop:
                size = self.sizes[self.index]
                try:
                    self._measure(i, size)
                except Exception as exc:  # noqa: BLE001 - an out-of-memory ends the sweep; anything else too
                    if not is_oom(exc):
                        logger.warning("calibration pass of %d samples failed: %s", size, type(exc).__name__)
                    release_memory()
                    self.stop = True
                self._barrier.wait()

    def _measure(self, i: int, size: int) -> None:
        batch = self.inputs.batch(size)
        clock = pass_clock(self.threads)  # as the loops will time their passes
        _timed(self.transformer, batch, clock)  # warm-up, not recorded
        times = [_timed(self.transformer, batch, clock) for _ in range(REPEATS)]
        self.costs.record(self.inputs.group, size, min(times), warm=True)
        self._spent_now[i] += sum(times)


def calibrate(
    transformer: Any,
    inputs: PassInputs,
    costs: CostModel,
    cores: int | None,
    fixed_loops: int = 0,
    make_costs: Callable[[], CostModel] | None = None,
) -> Calibration:
    """Measure ``transformer`` into ``costs`` and choose the loops (``fixed_loops`` > 0: that many, measured so)."""
    started = time.perf_counter()
    counts = [fixed_loops] if fixed_loops else loop_candidates(cores)
    candidates: dict[int, float] = {}
    tables: dict[int, CostModel] = {}
    for _ in range(ROUNDS if len(counts) > 1 else 1):
        for loops in counts:
            threads = max(1, cores // loops) if cores else None
            table = costs if len(counts) == 1 else (make_costs() if make_costs else CostModel(costs.max_batch))
            rate = _Sweep(transformer, inputs, table, loops, threads).run()
            if rate >= candidates.get(loops, -1.0):
                candidates[loops], tables[loops] = rate, table
    best = max(candidates.values())
    chosen = max(n for n, rate in candidates.items() if rate >= (1 - costs.tolerance) * best)
    if len(counts) > 1:
        costs.merge(tables[chosen])
    threads = max(1, cores // chosen) if cores else None
    result = Calibration(chosen, threads, time.perf_counter() - started, candidates)
    logger.info("step engine calibration: %s", result.to_dict())
    return result
