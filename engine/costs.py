"""The step engine's cost model of the device: how long one transformer pass takes, per resolution group and batch.

Why: batching pays only while the device has room. On a device already busy at a small batch, a larger batch
costs as much per image or more, and in a lockstep loop every request of the batch then finishes later, for no
more images per second. So the loop batches up to the size past which images per second stop growing, measured:

- ``record(group, size, seconds)``: every pass the loops run (and the start-up calibration, ``engine.calibrate``)
  refines the pass time of its (group, size) cell: the median of its last ``window`` counted passes. So the table
  follows the device as its load changes, within a few passes, and a pass stalled by a moment of other work (a
  decode beside the loop, another process) does not move it at all. The first pass of a cell is not counted: it
  pays one-off costs (allocations, kernel selection, compilation).
- ``best_batch(group)``: the knee, the smallest measured size whose images per second are within ``tolerance`` of
  the best measured (a smaller batch at about the same rate finishes its requests sooner).
- ``batch_limit(group, waiting)``: what a loop may put in one pass now. Never past the knee; within it, the size
  that finishes the ``waiting`` samples soonest on average: in waves of c samples, the mean request finishes after
  about t(c) x (ceil(waiting / c) + 1) / 2 passes' time, so a short queue gets small, quick passes and a long one
  the device's best rate (a burst then finishes in waves, not all at its end). While the rate still grows at the
  largest size measured (by more than the tolerance over the smaller ones) and more is waiting, one size more is
  tried (exploring, doubling from 1 for a group never seen), once that largest size has ``CONFIRM`` counted
  passes (a calibrated cell is confirmed): a size is judged on the median of a few passes, never on one, since
  one pass on a busy machine may well be a stalled one, and going past the knee on one lucky pass runs the
  dearest passes of all; and every ``probe_every`` passes of the group one size above the knee, so that a cell
  measured in a bad moment is measured again; less often where that size costs more than the knee's
  (``PROBE_EVERY`` passes times the ratio of their pass times), so that probing spends about 2% of the passes'
  time at most.

What a pass costs is timed by ``pass_clock``: on a CPU loop of one thread, that thread's CPU time, since the
whole pass runs in it; the time it spent descheduled while another thread ran (the other loop's pass, a decode,
another process) is not the pass's cost, and counting it made the cells of one device disagree by 2x on a
2-core machine, by what happened to run beside them. Elsewhere the wall clock (a GPU pass is synchronised).

Sizes count samples in a pass (both guidance halves), as ``--max-batch-size`` does. The cost model is shared by
the loops of one runner and written from their threads, so its table is behind a lock.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["CostModel", "pass_clock"]

TOLERANCE = 0.1  # images/s within 10% of the best measured count as the best: the smaller batch is taken
WINDOW = 9  # counted passes a cell's pass time is the median of (the most recent ones)
CONFIRM = 3  # counted passes of the largest size measured before the exploration goes past it
PROBE_EVERY = 50  # passes of a group between two tries of one size above its knee, times their cost ratio


def pass_clock(cpu_threads: int | None) -> Callable[[], float]:
    """What a loop times its passes with: its thread's CPU time where it runs them on one CPU thread
    (``cpu_threads`` 1), else the wall clock (see the module docstring)."""
    return time.thread_time if cpu_threads == 1 else time.perf_counter


@dataclass
class _Cell:
    recent: deque[float]  # the last counted pass times
    counted: int = 0
    seen: int = 0  # passes seen; the first is not counted (warm-up)
    calibrated: bool = False  # measured by the start-up calibration (the fastest of a few passes): confirmed

    @property
    def seconds(self) -> float:
        return statistics.median(self.recent)

    @property
    def confirmed(self) -> bool:
        return self.calibrated or self.counted >= CONFIRM


class CostModel:
    """Pass times per (group, batch size), measured; see the module docstring.

    Args:
        max_batch: the largest batch a loop may run (``--max-batch-size``).
        tolerance: how close to the best rate (a fraction) a smaller batch must come to be the knee.
        window: how many of a cell's most recent counted passes its pass time is the median of.
        probe_every: passes of a group between two tries above its knee (0: never).
        learn: False for a fixed policy: nothing is recorded, and a group with no cells batches up to ``max_batch``.
    """

    def __init__(
        self,
        max_batch: int,
        tolerance: float = TOLERANCE,
        window: int = WINDOW,
        probe_every: int = PROBE_EVERY,
        learn: bool = True,
    ) -> None:
        if max_batch < 1 or not 0 <= tolerance < 1 or window < 1:
            raise ValueError("max_batch >= 1, 0 <= tolerance < 1 and window >= 1")
        self.max_batch = max_batch
        self.tolerance = tolerance
        self.window = window
        self.probe_every = probe_every
        self.learn = learn
        self._cells: dict[Hashable, dict[int, _Cell]] = {}
        self._passes: Counter[Hashable] = Counter()  # passes recorded per group (for the probes)
        self._probed: Counter[Hashable] = Counter()  # the group's pass count at its last probe
        self._lock = threading.Lock()

    def record(self, group: Hashable, size: int, seconds: float, warm: bool = False) -> None:
        """One pass of ``size`` samples of ``group`` took ``seconds`` (``warm``: it came after a warm-up pass the
        caller did not record, so it counts even as the cell's first, and the cell is confirmed: the calibration records
        the fastest of a few passes)."""
        if not self.learn or size < 1 or seconds <= 0:
            return
        with self._lock:
            by_size = self._cells.setdefault(group, {})
            cell = by_size.get(size)
            if cell is None:
                cell = by_size[size] = _Cell(deque(maxlen=self.window))
            cell.seen += 1 + (warm and not cell.seen)
            cell.calibrated = cell.calibrated or warm
            self._passes[group] += 1
            if cell.seen == 1:
                return  # warm-up: not counted
            cell.recent.append(seconds)
            cell.counted += 1

    def merge(self, other: CostModel) -> None:
        """Take ``other``'s cells (a calibration measured apart), in place of this model's cells of those sizes."""
        with other._lock:
            cells = {
                group: {
                    size: _Cell(deque(c.recent, self.window), c.counted, c.seen, c.calibrated) for size, c in by.items()
                }
                for group, by in other._cells.items()
            }
        with self._lock:
            for group, by_size in cells.items():
                self._cells.setdefault(group, {}).update(by_size)

    def pass_time(self, group: Hashable, size: int) -> float | None:
        """The measured seconds of a pass of ``size`` samples of ``group`` (None: not measured)."""
        with self._lock:
            cell = self._cells.get(group, {}).get(size)
            return cell.seconds if cell is not None and cell.counted else None

    def rates(self, group: Hashable) -> dict[int, float]:
        """Samples per second of every measured size of ``group``, by size."""
        with self._lock:
            cells = self._cells.get(group, {})
            return {size: size / cell.seconds for size, cell in sorted(cells.items()) if cell.counted}

    def best_batch(self, group: Hashable) -> int | None:
        """The knee of ``group``: the smallest measured size within ``tolerance`` of the best rate (None: none)."""
        return self._knee(self.rates(group))

    def _knee(self, rates: dict[int, float]) -> int | None:
        if not rates:
            return None
        best = max(rates.values())
        return min(size for size, rate in rates.items() if rate >= (1 - self.tolerance) * best)

    def batch_limit(self, group: Hashable, waiting: int | None = None) -> int:
        """The most samples a loop may put in the next pass of ``group``, with ``waiting`` samples in it, running
        or not (None: as many as the knee holds); see the module docstring."""
        rates = self.rates(group)
        if not rates:
            return self.max_batch if not self.learn else 1
        knee = self._knee(rates)
        assert knee is not None
        largest = max(rates)
        more = waiting is None or waiting > largest
        if more and largest < self.max_batch:
            with self._lock:
                confirmed = self._cells[group][largest].confirmed
            if not confirmed:
                return largest  # measured again before anything is built on it (see the module docstring)
            smaller = [rate for size, rate in rates.items() if size < largest]
            if not smaller or rates[largest] > (1 + self.tolerance) * max(smaller):
                return min(self.max_batch, 2 * largest)  # still growing at the largest size measured: try one larger
        probe = self._probe(group, rates, knee) if more else None
        if probe is not None:
            return probe
        if waiting is None:
            return min(knee, self.max_batch)
        return min(self._soonest(rates, knee, waiting), self.max_batch)

    def _probe(self, group: Hashable, rates: dict[int, float], knee: int) -> int | None:
        """One size above the knee, when its turn has come (see the module docstring); else None."""
        if not self.probe_every or knee >= self.max_batch:
            return None
        above = [size for size in rates if size > knee]
        size = min(above) if above else min(self.max_batch, 2 * knee)
        # How much dearer a pass of that size is than the knee's (unmeasured: twice the samples, twice the time).
        ratio = (size / rates[size]) / (knee / rates[knee]) if size in rates else size / knee
        with self._lock:
            due = self._passes[group] - self._probed[group] >= self.probe_every * max(1.0, ratio)
            if due:
                self._probed[group] = self._passes[group]
        return size if due else None

    @staticmethod
    def _soonest(rates: dict[int, float], knee: int, waiting: int) -> int:
        """The measured size up to the knee whose waves finish ``waiting`` samples soonest on average."""

        def mean_finish(size: int) -> float:
            seconds = size / rates[size]
            return seconds * (-(-waiting // size) + 1)  # ceil(waiting / size) waves

        return min((size for size in rates if size <= knee), key=lambda size: (mean_finish(size), size))

    def table(self, label: Callable[[Hashable], str] = str) -> dict[str, Any]:
        """The table for /api/status: per group, its knee and each measured size's pass time and rate."""
        with self._lock:
            groups = {group: dict(sorted(cells.items())) for group, cells in self._cells.items()}
        out: dict[str, Any] = {}
        for group, cells in groups.items():
            measured = {size: cell for size, cell in cells.items() if cell.counted}
            out[label(group)] = {
                "best_batch": self._knee({size: size / cell.seconds for size, cell in measured.items()}),
                "passes": {
                    str(size): {
                        "ms": round(cell.seconds * 1000, 3),
                        "samples_per_s": round(size / cell.seconds, 2),
                        "counted": cell.counted,
                    }
                    for size, cell in measured.items()
                },
            }
        return out
