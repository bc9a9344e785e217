"""Quantized weights through diffusers' own integration: optimum-quanto, weight-only int8 or fp8.

Why quanto (``optimum-quanto``, pinned in requirements.txt) and not torchao: on this CPU with torch 2.13, torchao
0.18's compiled kernels do not load (its Python path works), and transformers imports torchao eagerly whenever it is
installed (every server start paid ~0.8 s and printed load errors). Quanto is imported only when a model is
quantized, runs int8 and fp8 weight-only layers on any device (on a CPU each matmul dequantizes its weight, one layer
at a time), and PEFT's LoRA layers wrap its ``QLinear`` (a ``torch.nn.Linear``) like any linear layer, so adapters
work on a quantized transformer.

A hub id or local directory is quantized at load: ``StableDiffusion3Pipeline.from_pretrained(...,
quantization_config=PipelineQuantizationConfig(quant_mapping=...))``, the per-component configs being diffusers'
``QuantoConfig`` for the transformer and transformers' for the text encoders. A random preset has no checkpoint: each
component to quantize is written to a temporary directory and loaded back through the same component
``from_pretrained`` the pipeline-level config calls, so its weights are quantized exactly as diffusers quantizes them.

Memory is what this is for, so the load keeps the saving (bench/small_memory.py measures it): checkpoints are read
without a memory map (``disable_mmap``: a live map keeps the fp32 pages it was read through resident), and the heap's
freed fp32 pages are handed back to the system (``malloc_trim``), which glibc's allocator otherwise keeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "component_config",
    "device_problem",
    "pipeline_config",
    "quantize_components",
    "quiet_deprecation",
    "trim_heap",
]

_QUANTO_WEIGHTS = {"int8": "int8", "fp8": "float8"}
FP8_CAPABILITY = (8, 9)  # Ada (8.9) and Hopper (9.0) and later have fp8 units


def device_problem(spec: Mapping[str, str], device: torch.device) -> str | None:
    """Why ``spec`` cannot run on ``device`` (None: it can): fp8 needs a CUDA GPU of capability 8.9 or more."""
    fp8 = sorted(component for component, kind in spec.items() if kind == "fp8")
    if not fp8:
        return None
    if device.type != "cuda":
        return f"fp8 ({', '.join(fp8)}) needs a CUDA GPU with fp8 support (Ada, Hopper); on {device.type} use int8"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return (
            f"fp8 ({', '.join(fp8)}) needs a GPU of compute capability 8.9 or more (Ada, Hopper); this one is "
            f"{capability[0]}.{capability[1]}: use int8"
        )
    return None


@contextlib.contextmanager
def quiet_deprecation() -> Iterator[None]:
    """diffusers 0.42 warns at every quanto config and load that its quanto integration goes in 1.0; requirements.txt
    keeps diffusers below 1.0, so the warning asks nothing of an operator. Only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Quanto.*deprecated", category=FutureWarning)
        yield


def component_config(component: str, kind: str) -> Any:
    """The quantization config diffusers' pipeline loader hands ``component``'s own ``from_pretrained``."""
    weights = _QUANTO_WEIGHTS[kind]
    if component == "transformer":
        from diffusers import QuantoConfig

        with quiet_deprecation():
            return QuantoConfig(weights_dtype=weights)
    from transformers import QuantoConfig as TextQuantoConfig

    return TextQuantoConfig(weights=weights)


def pipeline_config(spec: Mapping[str, str]) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` for ``spec`` (None when nothing is quantized)."""
    if not spec:
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={c: component_config(c, k) for c, k in spec.items()})


def quantize_components(pipe: Any, spec: Mapping[str, str], dtype: torch.dtype) -> None:
    """Quantize ``pipe``'s components in place, each through its class's ``from_pretrained`` with its config (see
    the module's docstring); each ends on the device it was on."""
    for component, kind in spec.items():
        module = getattr(pipe, component)
        cls, device = type(module), module.device
        with tempfile.TemporaryDirectory(prefix="sd3-quantize-") as folder:
            module.save_pretrained(folder)
            # The full-precision copy goes before the quantized one is read: the peak is one copy, not two.
            setattr(pipe, component, None)
            del module
            gc.collect()
            quantized = _load(cls, folder, component_config(component, kind), dtype)
        if device.type != "cpu":
            quantized.to(device)
        setattr(pipe, component, quantized)
        logger.info("quantized %s to %s (quanto, weight-only)", component, kind)
    trim_heap()


def _load(cls: type, folder: str, config: Any, dtype: torch.dtype) -> Any:
    from diffusers import ModelMixin

    # diffusers' models take torch_dtype, transformers' take dtype (torch_dtype is deprecated there).
    dtype_kwarg = "torch_dtype" if issubclass(cls, ModelMixin) else "dtype"
    arguments = {"quantization_config": config, dtype_kwarg: dtype, "disable_mmap": True}
    with quiet_deprecation():
        module = cls.from_pretrained(folder, **arguments)  # type: ignore[attr-defined]
    module.eval()
    module.requires_grad_(False)
    return module


def trim_heap(collect: bool = True) -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). After a load that
    freed full-precision weights, glibc keeps their pages for later allocations, and the process stays as large as
    if it had never quantized. ``collect``: a full garbage collection first (after a load; the server's idle-time
    trim goes without, engine.memory explains why)."""
    if collect:
        gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators return large blocks themselves
        return
    libc.malloc_trim(0)
