"""Loading one model through the ``ComponentCache``: each weight-bearing component is taken from the cache when an
identical one (same content, dtype, device and quantization) is resident, else loaded with its class's own
``from_pretrained(folder, subfolder=name, ...)`` and put there; the tokenizers and the scheduler are the model's own.
The issue-31 options (``LoadOptions``: quantization, no T5, the encoders' device) are honoured as
``Pipelines.TextToImagePipelineSD3`` honours them, with its helpers (``_place``, ``models.quantize``, its error
explanations). A hub id resolves to its local snapshot (nothing is downloaded here); a ``random:`` preset is built as
today and shares by the digest of each component's ``state_dict``.

``plan_model`` estimates a model before loading it (element counts from the safetensors headers times the dtype's
size; a preset's parameter counts), with each component's cache key where the files tell it, so that the registry
knows what a load will add beside what is resident.
"""

from __future__ import annotations

import importlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch

from models.options import LoadOptions
from Pipelines import (
    _ENCODERS,
    ModelLoadError,
    TextToImagePipelineSD3,
    _check_local_dir,
    _place,
    resolve_device,
)

from .components import ComponentCache, FileDigests, Part, component_key, identity_of_dir, identity_of_module, nbytes
from .specs import ModelSpec

logger = logging.getLogger(__name__)

__all__ = ["load_model", "parts_of", "plan_model", "resolve_source"]

_NO_T5 = ("text_encoder_3", "tokenizer_3")
_QUANT_BYTES = 1  # int8 and fp8: one byte a weight (the scales are noise beside it)


def resolve_source(source: str) -> Path:
    """The local folder of a ``save_pretrained`` directory or of a hub id's snapshot (local files only)."""
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model directory {source!r} does not exist",
                "check the path, or give a hub id such as stabilityai/stable-diffusion-3.5-medium",
            )
        _check_local_dir(path)
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as exc:
        raise TextToImagePipelineSD3(source)._explain(exc) from exc


def _index(folder: Path) -> dict[str, tuple[str | None, str | None]]:
    data = json.loads((folder / "model_index.json").read_text())
    return {k: (v[0], v[1]) for k, v in data.items() if not k.startswith("_") and isinstance(v, list)}


def _class(library: str, name: str) -> type:
    return getattr(importlib.import_module(library), name)


def _is_weighted(library: str, name: str) -> bool:
    return issubclass(_class(library, name), torch.nn.Module)


def _where(component: str, device: torch.device, options: LoadOptions) -> torch.device:
    """Where ``_place`` puts ``component``: the text encoders on --encoders-device, the rest on ``device``."""
    if component in _ENCODERS and options.encoders_device:
        return resolve_device(options.encoders_device)
    return device


def _header_elements(path: Path) -> int | None:
    """The number of elements in a safetensors file, from its header (None: not safetensors, or unreadable)."""
    if path.suffix != ".safetensors":
        return None
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            total += count
    return total


def _estimate_folder(folder: Path, itemsize: int) -> int:
    total = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        elements = _header_elements(path)
        if elements is not None:
            total += elements * itemsize
        elif path.name.endswith((".bin", ".pt", ".pth", ".ckpt")):
            total += path.stat().st_size * itemsize // 4  # pickled checkpoints: fp32 assumed
    return total


def _weighted_components(folder: Path, options: LoadOptions) -> list[tuple[str, str, str]]:
    """(component, library, class) of each weight-bearing component the load will take."""
    found = []
    for name, (library, cls) in _index(folder).items():
        if library and cls and not (name in _NO_T5 and not options.t5) and _is_weighted(library, cls):
            found.append((name, library, cls))
    return found


def plan_model(
    spec: ModelSpec,
    options: LoadOptions,
    device: torch.device,
    dtype: torch.dtype,
    digests: FileDigests | None = None,
) -> list[Part]:
    """The model's components before loading: estimated bytes, and (given ``digests``, which hashes the weight files
    unless known) each one's cache key; a ``random:`` preset's keys are unknown until it is built."""
    if spec.source.startswith("random:"):
        from models.random_build import parameter_counts

        try:
            counts = parameter_counts(spec.source)
        except ValueError as exc:
            raise ModelLoadError(str(exc), "use one of the random: presets listed") from exc
        return [
            Part(
                name,
                None,
                n * (_QUANT_BYTES if name in options.quantize else dtype.itemsize),
                _where(name, device, options).type == device.type,
            )
            for name, n in counts.items()
            if options.t5 or name != "text_encoder_3"
        ]
    folder = resolve_source(spec.source)
    parts = []
    for name, library, cls in _weighted_components(folder, options):
        itemsize = _QUANT_BYTES if name in options.quantize else dtype.itemsize
        where = _where(name, device, options)
        key = None
        if digests is not None:
            key = component_key(
                identity_of_dir(folder / name, f"{library}.{cls}", digests), dtype, where, options.quantize.get(name)
            )
        parts.append(Part(name, key, _estimate_folder(folder / name, itemsize), where.type == device.type))
    return parts


def _from_pretrained(cls: type, folder: Path, name: str, dtype: torch.dtype, quantize: str | None) -> Any:
    from diffusers import ModelMixin

    from models.quantize import component_config, quiet_deprecation

    arguments: dict[str, Any] = {"subfolder": name}
    if issubclass(cls, torch.nn.Module):
        # diffusers' models take torch_dtype, transformers' take dtype (as the pipeline's loader hands them).
        arguments["torch_dtype" if issubclass(cls, ModelMixin) else "dtype"] = dtype
    if quantize:
        # No memory map: a live one keeps the full-precision pages it was read through (models/quantize.py).
        arguments.update(quantization_config=component_config(name, quantize), disable_mmap=True)
    with quiet_deprecation():
        return cls.from_pretrained(folder, **arguments)  # type: ignore[attr-defined]


def _load_folder(
    spec: ModelSpec,
    options: LoadOptions,
    device: torch.device,
    dtype: torch.dtype,
    cache: ComponentCache,
    digests: FileDigests,
) -> Any:
    from diffusers import StableDiffusion3Pipeline

    folder = resolve_source(spec.source)
    components: dict[str, Any] = {}
    for name, (library, cls_name) in _index(folder).items():
        if not library or not cls_name or (name in _NO_T5 and not options.t5):
            components[name] = None  # SD3's documented way to run without T5; absent optional parts
            continue
        cls = _class(library, cls_name)
        if not issubclass(cls, torch.nn.Module):
            components[name] = _from_pretrained(cls, folder, name, dtype, None)  # the model's own
            continue
        kind = options.quantize.get(name)
        identity = identity_of_dir(folder / name, f"{library}.{cls_name}", digests)
        key = component_key(identity, dtype, _where(name, device, options), kind)
        module = cache.take(key, spec.name)
        if module is None:
            logger.debug("loading %s's %s (%s)", spec.name, name, identity.short)
            module = cache.put(key, identity, _from_pretrained(cls, folder, name, dtype, kind), spec.name)
        components[name] = module
    pipeline = StableDiffusion3Pipeline(**components)
    encoders = resolve_device(options.encoders_device) if options.encoders_device else device
    return _place(pipeline, device, encoders)


def _load_random(
    spec: ModelSpec, options: LoadOptions, device: torch.device, dtype: torch.dtype, cache: ComponentCache
) -> Any:
    from models.quantize import quantize_components
    from models.random_build import RANDOM_PRESETS, build_random_pipeline

    encoders = resolve_device(options.encoders_device) if options.encoders_device else device
    try:
        pipeline = build_random_pipeline(
            spec.source, device=device, dtype=dtype, t5=options.t5, encoders_device=encoders
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc), f"use one of: {', '.join(RANDOM_PRESETS)}") from exc
    for name, module in list(pipeline.components.items()):
        if not isinstance(module, torch.nn.Module):
            continue
        identity = identity_of_module(module)  # before quantizing: the content the preset built
        kind = options.quantize.get(name)
        key = component_key(identity, dtype, _where(name, device, options), kind)
        cached = cache.take(key, spec.name)
        if cached is None:
            if kind:
                quantize_components(pipeline, {name: kind}, dtype)
            cached = cache.put(key, identity, getattr(pipeline, name), spec.name)
        setattr(pipeline, name, cached)  # the fresh copy of a shared component goes with the build
    return pipeline


def load_model(
    spec: ModelSpec,
    options: LoadOptions,
    device: torch.device | str,
    dtype: torch.dtype,
    cache: ComponentCache,
    digests: FileDigests | None = None,
) -> TextToImagePipelineSD3:
    """Load ``spec`` (see the module's docstring) -> the object ``TextToImagePipelineSD3(...).start()`` returns
    (``.pipeline``, ``.device``, ``.dtype``). Its components are held in ``cache`` under ``spec.name``; a load that
    fails holds nothing. Raises ``ModelLoadError`` with a hint."""
    device = torch.device(device)
    try:
        if spec.source.startswith("random:"):
            pipeline = _load_random(spec, options, device, dtype, cache)
        else:
            try:
                pipeline = _load_folder(spec, options, device, dtype, cache, digests or FileDigests())
            except ModelLoadError:
                raise
            except Exception as exc:
                raise TextToImagePipelineSD3(spec.source)._explain(exc) from exc
    except BaseException:
        cache.release(spec.name)
        raise
    if options.quantize:
        from models.quantize import trim_heap

        trim_heap()
    # tqdm bars from concurrent requests interleave into noise on stderr; the server logs instead.
    pipeline.set_progress_bar_config(disable=True)
    loaded = TextToImagePipelineSD3(spec.source, device=str(device), dtype=str(dtype), options=options)
    loaded.pipeline, loaded.device, loaded.dtype = pipeline, device, dtype
    return loaded


def _module_device(module: Any) -> torch.device | None:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return None


def parts_of(name: str, loaded: Any, cache: ComponentCache | None, device: torch.device) -> list[Part]:
    """The measured components of a loaded model: its cache keys (a private key for one the cache does not hold,
    e.g. from a custom loader) and bytes."""
    parts = []
    for component, module in loaded.pipeline.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        key = (cache.key_of(module) if cache is not None else None) or f"{name}/{component}@{id(module):x}"
        where = _module_device(module)
        on_device = where is None or where.type == torch.device(device).type
        parts.append(Part(component, key, nbytes(module), on_device, module))
    return parts
