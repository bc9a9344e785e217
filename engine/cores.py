"""The CPU's cores, shared by the step engine's denoising passes and its slot threads' VAE decodes.

Why: on a CPU the step engine's loops own the cores (one thread each, or a share), and a request that leaves the
loop decodes in its slot thread beside them. Unchecked, a decode is one thread more than there are cores: on a
2-core machine two loops and one decode time-share two cores, so the decode (the last work of a request that is
nearly done) runs at two thirds of a core while the loops' requests run slower too. The threads engine never does
that: a slot decodes on its own core and its next request starts after. Measured (bench/RESULTS.md, "Issue 21:
pass times by CPU time, judged on medians, decodes first"; ``bench/ranked_bursts.py``): at 512x512, a burst of 4 on
two one-thread loops finished its first two requests 0.26 s later than the threads engine, for the same makespan
(mean latency 1.09x); with this module, 1.02x.

So a decode goes first, as the request closest to done: ``decoding()`` takes one core as soon as one is free, and
while a decode waits, no pass takes a core (``passing(n)`` waits). A pass holds its loop's threads' worth of
cores for its transformer pass and scheduler steps only, so a decode waits at most one pass. The wait begins when
the loop finishes the request (``promise()``, in the pass that took its last step), not when its slot thread
wakes up: else the loop, running already, took the core back for its next pass before the woken thread asked.
On other devices the loops and the decodes do not share cores, and the runner has no ``Cores``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["Cores"]


class Cores:
    """``cores`` CPU cores, taken by passes (``passing``) and decodes (``decoding``, first)."""

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError("cores must be >= 1")
        self.cores = cores
        self._free = cores
        self._decodes_waiting = 0
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        return self._free

    @contextlib.contextmanager
    def passing(self, threads: int | None) -> Iterator[None]:
        """Hold ``threads`` cores (all of them for None; never more than there are) for one pass; while a decode
        waits for a core, wait for it to have one."""
        need = min(threads or self.cores, self.cores)
        with self._changed:
            self._changed.wait_for(lambda: not self._decodes_waiting and self._free >= need)
            self._free -= need
        try:
            yield
        finally:
            self._give_back(need)

    def promise(self) -> None:
        """A decode is on its way (its request just left a loop): passes wait for it from now. Its
        ``decoding(promised=True)`` must follow."""
        with self._changed:
            self._decodes_waiting += 1

    @contextlib.contextmanager
    def decoding(self, promised: bool = False) -> Iterator[None]:
        """Hold one core for a decode, taken ahead of every pass that waits (``promised``: counted as waiting
        since its ``promise()``)."""
        with self._changed:
            self._decodes_waiting += not promised
            try:
                self._changed.wait_for(lambda: self._free >= 1)
            finally:
                self._decodes_waiting -= 1
            self._free -= 1
            if not self._decodes_waiting:
                self._changed.notify_all()  # passes held back for the decodes may go (if cores are free)
        try:
            yield
        finally:
            self._give_back(1)

    def _give_back(self, count: int) -> None:
        with self._changed:
            self._free += count
            self._changed.notify_all()
