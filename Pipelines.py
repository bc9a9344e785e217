"""Model loading: which model, on which device, in which dtype. No HTTP here.

``ModelPipelineInitializer(model, type_models="t2im").initialize_pipeline()`` returns an object whose
``start()`` loads the pipeline once and exposes ``.pipeline`` and ``.device``. ``model`` is a Hugging Face hub id,
any local directory written by ``save_pretrained``, or a random-weight preset (``random:tiny``,
``random:sd3.5-medium``) that is built offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.dtypes import DTYPE_ALIASES
from models.options import LoadOptions
from models.random_build import RANDOM_PRESETS, build_random_pipeline, is_random_preset, parameter_counts

logger = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "LoadOptions",
    "ModelLoadError",
    "ModelPipelineInitializer",
    "PresetModels",
    "TextToImagePipelineSD3",
    "available_bytes",
    "preflight",
    "quiet_library_logs",
    "required_bytes",
    "resolve_device",
    "resolve_dtype",
]


@dataclass(frozen=True)
class PresetModels:
    """Known SD3-family checkpoints (hub ids) and the offline random-weight presets."""

    SD3: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    SD3_5_LARGE: str = "stabilityai/stable-diffusion-3.5-large"
    SD3_5_LARGE_TURBO: str = "stabilityai/stable-diffusion-3.5-large-turbo"
    SD3_5_MEDIUM: str = "stabilityai/stable-diffusion-3.5-medium"
    RANDOM_TINY: str = "random:tiny"
    RANDOM_SD3_5_MEDIUM: str = "random:sd3.5-medium"


DTYPES: dict[str, torch.dtype] = {name: getattr(torch, canonical) for name, canonical in DTYPE_ALIASES.items()}
SUPPORTED_TYPES = ("t2im",)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; ``hint`` says what to do about it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}\nHint: {hint}")
        self.message = message
        self.hint = hint


def resolve_device(requested: str | None = None) -> torch.device:
    """The device to run on: ``requested`` if given, else cuda, then mps, then cpu."""
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {requested!r} was asked for but CUDA is not available", "use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {requested!r} was asked for but there are {torch.cuda.device_count()} CUDA device(s)",
                f"use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError(f"device {requested!r} was asked for but MPS is not available", "use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(requested: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype to load in: ``requested`` if given, else bfloat16 on a GPU, float16 on MPS, float32 on CPU."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested and requested != "auto":
        try:
            return DTYPES[requested.lower()]
        except KeyError:
            raise ModelLoadError(
                f"unknown dtype {requested!r}", f"use one of: auto, {', '.join(sorted(set(DTYPES)))}"
            ) from None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def required_bytes(model: str, dtype: torch.dtype, t5: bool = True) -> int | None:
    """Peak bytes of building the model's weights in ``dtype`` (without T5: ``t5=False``); None where that is unknown
    before loading (hub ids, local directories: their size is only known once downloaded)."""
    if model not in RANDOM_PRESETS:
        return None
    counts = [n for name, n in parameter_counts(model).items() if t5 or name != "text_encoder_3"]
    # A random preset initialises each component in float32, then casts it: the largest one briefly holds 4 bytes
    # a weight while the components before it already hold ``dtype``.
    return sum(counts) * dtype.itemsize + max(counts) * max(0, 4 - dtype.itemsize)


def available_bytes(device: torch.device) -> int:
    """Memory the weights can still take on ``device``: free GPU memory, or on CPU (and MPS, whose memory is the
    machine's) the available RAM, capped by a container's memory limit and the process's address-space limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import resource

    import psutil

    room = [psutil.virtual_memory().available]
    limit = Path("/sys/fs/cgroup/memory.max")
    with contextlib.suppress(OSError, ValueError):
        room.append(int(limit.read_text()) - int((limit.parent / "memory.current").read_text()))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room.append(soft - psutil.Process().memory_info().vms)
    return max(0, min(room))


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory(model: str, device: torch.device, dtype: torch.dtype, t5: bool = True) -> None:
    """Refuse, with the figures and what to change, a model whose weights cannot fit; before allocating any."""
    need = required_bytes(model, dtype, t5)
    if need is None:
        return
    have = available_bytes(device)
    if need <= have:
        return
    options = []
    if dtype.itemsize > 2:
        options.append(f"--dtype bfloat16 (about {_gb(required_bytes(model, torch.bfloat16) or 0)})")
    if device.type != "cuda":
        options.append("a GPU with enough memory (--device cuda)")
    options.append("--model random:tiny to try the server without large weights")
    raise ModelLoadError(
        f"{model} needs about {_gb(need)} to build its weights in {str(dtype).removeprefix('torch.')}, "
        f"but {device} has {_gb(have)} available",
        "use " + ", or ".join(options),
    )


def preflight(
    model: str, device: str | None, dtype: str | None, options: LoadOptions | None = None
) -> tuple[torch.device, torch.dtype]:
    """Everything about the model that can be checked before loading it: the devices exist, the dtype is known, the
    quantization runs there and the weights fit. Raises ``ModelLoadError`` with a hint."""
    options = options or LoadOptions()
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if options.encoders_device:
        resolve_device(options.encoders_device)
    from models.quantize import device_problem

    problem = device_problem(options.quantize, resolved_device)
    if problem:
        raise ModelLoadError(f"--quantize: {problem}", "use --quantize COMPONENT=int8, which runs on any device")
    check_memory(model, resolved_device, resolved_dtype, options.t5)
    return resolved_device, resolved_dtype


def quiet_library_logs() -> None:
    """Silence start-up noise that asks nothing of the user: transformers warns, on every start, that torchvision is
    not installed (image processors the SD3 pipeline never uses)."""
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


def _check_local_dir(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{path} is not a diffusers pipeline directory (no model_index.json)",
            "point --model at a directory written by pipeline.save_pretrained(), or at a hub id",
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {index}: {exc}", "re-save the pipeline with save_pretrained()") from exc
    if class_name and "StableDiffusion3" not in class_name:
        raise ModelLoadError(
            f"{path} holds a {class_name}, not a Stable Diffusion 3 pipeline",
            "this server serves SD3 / SD3.5 text-to-image pipelines",
        )


class TextToImagePipelineSD3:
    """Loads one SD3 / SD3.5 text-to-image pipeline; ``start()`` does the work, once."""

    def __init__(
        self,
        model_path: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        options: LoadOptions | None = None,
    ) -> None:
        self.model_path = model_path or os.environ.get("MODEL_PATH") or PresetModels.SD3_5_MEDIUM
        self.requested_device = device
        self.requested_dtype = dtype
        self.options = options or LoadOptions()
        self.pipeline: Any | None = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None

    def start(self) -> TextToImagePipelineSD3:
        """Load the pipeline onto the resolved device and dtype. Raises ``ModelLoadError`` with a hint."""
        if self.pipeline is not None:
            return self
        device = resolve_device(self.requested_device)
        dtype = resolve_dtype(self.requested_dtype, device)
        logger.debug("loading %s on %s as %s", self.model_path, device, dtype)  # the server logs its own line
        options = self.options
        encoders = resolve_device(options.encoders_device) if options.encoders_device else device
        if is_random_preset(self.model_path):
            try:
                pipeline = build_random_pipeline(
                    self.model_path, device=device, dtype=dtype, t5=options.t5, encoders_device=encoders
                )
            except ValueError as exc:
                raise ModelLoadError(str(exc), f"use one of: {', '.join(RANDOM_PRESETS)}") from exc
            if options.quantize:
                from models.quantize import quantize_components

                quantize_components(pipeline, options.quantize, dtype)
        else:
            pipeline = _place(self._from_pretrained(dtype), device, encoders)
        # tqdm bars from concurrent requests interleave into noise on stderr; the server logs instead.
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline, self.device, self.dtype = pipeline, device, dtype
        return self

    def _from_pretrained(self, dtype: torch.dtype) -> Any:
        from diffusers import StableDiffusion3Pipeline

        path = Path(self.model_path).expanduser()
        looks_local = path.is_absolute() or self.model_path.startswith((".", "~")) or path.exists()
        if looks_local:
            if not path.is_dir():
                raise ModelLoadError(
                    f"model directory {self.model_path!r} does not exist",
                    "check the path, or give a hub id such as stabilityai/stable-diffusion-3.5-medium",
                )
            _check_local_dir(path)
            source = str(path)
        else:
            source = self.model_path
        arguments: dict[str, Any] = {"dtype": dtype}
        if not self.options.t5:
            arguments.update(text_encoder_3=None, tokenizer_3=None)  # SD3's documented way to run without T5
        from models.quantize import pipeline_config, quiet_deprecation, trim_heap

        if self.options.quantize:
            # No memory map: a live one keeps the full-precision pages it was read through (models/quantize.py).
            arguments.update(quantization_config=pipeline_config(self.options.quantize), disable_mmap=True)
        try:
            with quiet_deprecation():
                pipeline = StableDiffusion3Pipeline.from_pretrained(source, **arguments)
        except Exception as exc:
            raise self._explain(exc) from exc
        if self.options.quantize:
            trim_heap()
        return pipeline

    def _explain(self, exc: Exception) -> ModelLoadError:
        # The useful signal is often in a chained cause (huggingface_hub errors wrapped in an OSError).
        chain: list[BaseException] = []
        current: BaseException | None = exc
        while current is not None and len(chain) < 5:
            chain.append(current)
            current = current.__cause__ or current.__context__
        names = " ".join(type(e).__name__ for e in chain)
        text = " ".join(str(e) for e in chain).lower()
        if "gated" in names.lower() or "gated" in text or " 401" in text or " 403" in text:
            hint = "accept the model's licence on its hub page and set HF_TOKEN (or run `hf auth login`)"
        elif "RepositoryNotFound" in names or " 404" in text:
            hint = "check the model id, or point --model at a local directory written by save_pretrained()"
        elif "LocalEntryNotFound" in names or any(
            word in text for word in ("offline", "cached", "connect", "outgoing traffic", "resolve")
        ):
            hint = (
                "the weights are not in the local cache and the hub cannot be reached: download them on a "
                "connected machine (or copy the cache), point --model at a local directory, or use "
                "--model random:tiny to run offline with random weights"
            )
        else:
            hint = "check that the model is a Stable Diffusion 3 pipeline in diffusers format"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return ModelLoadError(f"cannot load model {self.model_path!r}: {type(exc).__name__}: {first_line}", hint)


_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _place(pipeline: Any, device: torch.device, encoders: torch.device) -> Any:
    """Each component on its device, once, at load: the text encoders on ``encoders``, the rest on ``device``. No
    offload hooks: nothing moves while requests run (diffusers' hooks keep state on the shared modules)."""
    for name, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            module.to(encoders if name in _ENCODERS else device)
    return pipeline


class ModelPipelineInitializer:
    """Picks the loader for ``type_models`` (only ``t2im``, text-to-image, today)."""

    def __init__(
        self,
        model: str | None = None,
        type_models: str = "t2im",
        device: str | None = None,
        dtype: str | None = None,
        options: LoadOptions | None = None,
    ) -> None:
        self.model = model or os.environ.get("MODEL_PATH") or PresetModels.SD3_5_MEDIUM
        self.type_models = type_models
        self.device = device
        self.dtype = dtype
        self.options = options

    def initialize_pipeline(self) -> TextToImagePipelineSD3:
        """Return the (not yet started) loader for the configured model."""
        if self.type_models not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"unsupported type_models {self.type_models!r}",
                f"use one of: {', '.join(SUPPORTED_TYPES)} (text-to-image with SD3 / SD3.5)",
            )
        return TextToImagePipelineSD3(self.model, device=self.device, dtype=self.dtype, options=self.options)
