"""Measuring memory on the device that runs the work: the allocator's statistics on a GPU, the process's on a CPU.

On CUDA the caching allocator counts what tensors hold (``memory_allocated``) and its high-water mark, which
``reset_peak_memory_stats`` restarts. On a CPU the process's resident set is the figure (psutil), and its high-water
mark is the kernel's ``VmHWM``, which writing ``5`` to ``/proc/self/clear_refs`` restarts (Linux); where that is not
allowed, the peak is the resident set read at the end (an under-estimate the running observations correct upward).
Both are the whole process's or device's: a measurement means something only while one piece of work runs alone.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import psutil
import torch

logger = logging.getLogger(__name__)

__all__ = ["MemoryMeter"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class MemoryMeter:
    """The memory in use, its peak since ``reset_peak()``, and the free memory, on ``device``."""

    def __init__(self, device: Any) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self._process = psutil.Process()
        self._hwm_resets = not self.cuda and self._try_reset_hwm()
        self.source = "cuda allocator" if self.cuda else ("process VmHWM" if self._hwm_resets else "process RSS")

    def _index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    @staticmethod
    def _try_reset_hwm() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def current(self) -> int:
        """Bytes in use now: tensors on the GPU, the resident set on a CPU."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self._index()))
        return int(self._process.memory_info().rss)

    def reset_peak(self) -> None:
        """Start a new high-water mark at the current use."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self._index())
        elif self._hwm_resets:
            self._hwm_resets = self._try_reset_hwm()

    def peak(self) -> int:
        """The most bytes in use since ``reset_peak()`` (on a CPU without VmHWM resets: now)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self._index()))
        if self._hwm_resets:
            with contextlib.suppress(OSError, ValueError):
                for line in _STATUS.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return max(int(line.split()[1]) * 1024, self.current())
        return self.current()

    def free(self) -> int:
        """Bytes the device can still give: free GPU memory (plus what the allocator caches unused), or the
        machine's available memory capped by a container limit."""
        if self.cuda:
            index = self._index()
            cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
            return int(torch.cuda.mem_get_info(index)[0] + cached)
        room = [psutil.virtual_memory().available]
        limit = Path("/sys/fs/cgroup/memory.max")
        with contextlib.suppress(OSError, ValueError):
            room.append(int(limit.read_text()) - int((limit.parent / "memory.current").read_text()))
        return max(0, min(room))

    def measure(self, work: Any) -> int:
        """Run ``work()`` and return the peak bytes it added over what was in use before it."""
        before = self.current()
        self.reset_peak()
        work()
        if self.cuda:
            torch.cuda.synchronize(self._index())
        return max(0, self.peak() - before)
