"""Device memory: recognising an out-of-memory failure, and handing cached blocks back to the device."""

from __future__ import annotations

import torch

__all__ = ["is_oom", "release_memory"]


def is_oom(exc: BaseException) -> bool:
    """True for the out-of-memory errors of the host and of CUDA."""
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))


def release_memory() -> None:
    """Return the accelerator's cached blocks to the device (nothing to do on a CPU).

    No ``gc.collect()`` here: tensors are freed by reference counting, and a full collection with a pipeline loaded
    takes ~0.2 s holding the GIL, which delayed every response on a CPU server (bench/RESULTS.md). Only an
    out-of-memory failure collects first.
    """
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()
