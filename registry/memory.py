"""Amounts of memory as an operator writes them (``6GB``, ``500MB``, ``1.5GiB``, ``1073741824``, ``0.8`` of the
device, ``80%``), and how much memory a device has. Light: torch and psutil are imported only to measure."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

__all__ = ["UNITS", "device_total", "parse_memory"]

# Decimal units as disks and the issue write them (6GB = 6e9 bytes); binary ones spelled with an i.
UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_AMOUNT = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z%]*)")
_HOW = "write bytes (1073741824), a size with a unit (6GB, 500MB, 1.5GiB) or a fraction of the device (0.8, 80%)"


def parse_memory(text: str, total: int) -> int:
    """``text`` in bytes; a fraction (``0.8``, ``80%``) is of ``total``. ValueError saying what to write instead."""
    match = _AMOUNT.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not an amount of memory: {_HOW}")
    number, unit = match["number"], match["unit"].lower()
    if unit == "%":
        value = float(number) / 100 * total
    elif not unit and "." in number:
        fraction = float(number)
        if not 0 < fraction <= 1:
            raise ValueError(f"{text!r}: a fraction of the device is between 0 and 1 (0.8 is 80%): {_HOW}")
        value = fraction * total
    elif not unit:
        value = int(number)
    elif unit in UNITS:
        value = float(number) * UNITS[unit]
    else:
        raise ValueError(f"{text!r}: unknown unit {match['unit']!r}; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    if value < 1:
        raise ValueError(f"{text!r} is no memory at all: {_HOW}")
    return int(value)


def _cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), None without one."""
    for path in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            value = int(path.read_text().strip())  # "max" (no limit) raises ValueError
            if value < 1 << 60:  # cgroup v1 writes a huge number for no limit
                return value
    return None


def device_total(device: Any) -> int:
    """The memory of ``device`` (a ``torch.device`` or its name): a GPU's total memory, else the machine's RAM capped
    by a container's limit (a CPU and MPS, whose memory is the machine's)."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    import psutil

    total = int(psutil.virtual_memory().total)
    limit = _cgroup_limit()
    return min(total, limit) if limit else total
