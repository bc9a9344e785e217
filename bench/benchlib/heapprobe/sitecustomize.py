"""A heap probe for the server process of ``bench/soak_memory.py --heap`` (never imported by the server itself).

The soak puts this directory first on the server's ``PYTHONPATH``; Python imports ``sitecustomize`` at start-up, and
this one installs two signal handlers that write what glibc's allocator holds to the file named by
``SOAK_HEAP_PROBE`` (JSON, replaced atomically):

- ``SIGUSR1``: the process's RSS, ``mallinfo2()`` (bytes in use in malloc's arenas, free but kept there, mapped
  directly), the number of arenas (``malloc_info``), and with ``SOAK_TRACEMALLOC=1`` the bytes Python's own objects
  hold (tracemalloc) and the 12 source lines whose allocations grew most since the first probe, and with
  ``SOAK_TENSORS=1`` the bytes of the CPU tensors alive (their storages, found by the garbage collector);
- ``SIGUSR2``: the same after ``malloc_trim(0)``, with the RSS before it and the seconds it took: how much of the
  RSS was free memory that the allocator kept rather than memory anything still uses.

Measurement only: it changes nothing the server does between probes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
import tracemalloc

_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


_first: list[tracemalloc.Snapshot] = []


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _arenas(libc: ctypes.CDLL) -> int:
    with tempfile.NamedTemporaryFile("r", suffix=".xml") as out:
        libc.fopen.restype = ctypes.c_void_p
        handle = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(handle))
        libc.fclose(ctypes.c_void_p(handle))
        return len(re.findall(r"<heap nr=", out.read()))


def _python_objects() -> dict[str, object]:
    if not tracemalloc.is_tracing():
        return {}
    snapshot = tracemalloc.take_snapshot()
    if not _first:
        _first.append(snapshot)
    grown = snapshot.compare_to(_first[0], "lineno")[:12]
    return {
        "traced_bytes": tracemalloc.get_traced_memory()[0],
        "grown": [f"{stat.size_diff / 1024:+.0f} KiB {stat.count_diff:+d} {stat.traceback[0]}" for stat in grown],
    }


def _tensors() -> dict[str, object]:
    """The CPU tensors alive (reachable by the garbage collector): their storages' bytes and count."""
    torch = sys.modules.get("torch")
    if torch is None or os.environ.get("SOAK_TENSORS") != "1":
        return {}
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            with contextlib.suppress(Exception):  # a tensor without storage (sparse, a subclass) is not counted
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return {"tensor_bytes": sum(storages.values()), "tensor_storages": len(storages)}


def _probe(signum: int, frame: object) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    result: dict[str, object] = {"rss_before_trim": _rss()}
    if signum == signal.SIGUSR2:
        started = time.perf_counter()
        libc.malloc_trim(0)
        result["trim_s"] = time.perf_counter() - started
    info = libc.mallinfo2()
    result.update(
        rss=_rss(),
        heap_in_use=info.uordblks + info.hblkhd,
        heap_free=info.fordblks,
        heap_mmapped=info.hblkhd,
        arenas=_arenas(libc),
        **_python_objects(),
        **_tensors(),
    )
    path = os.environ["SOAK_HEAP_PROBE"]
    with open(path + ".tmp", "w") as out:
        json.dump(result, out)
    os.replace(path + ".tmp", path)


if os.environ.get("SOAK_HEAP_PROBE"):
    if os.environ.get("SOAK_TRACEMALLOC") == "1":
        tracemalloc.start()
    signal.signal(signal.SIGUSR1, _probe)
    signal.signal(signal.SIGUSR2, _probe)
