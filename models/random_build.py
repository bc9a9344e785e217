"""Building a random preset (see ``models.presets``): every component constructed in memory from its config, filled
with seeded random weights, on the target device. Nothing is read from the network or the disk."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from .presets import PRESET_CONFIGS, RANDOM_PRESETS, SCHEDULER_CONFIG, VAE_COMMON, check_preset, is_random_preset
from .random_tokenizers import build_clip_tokenizer, build_t5_tokenizer, clip_config, t5_config

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

logger = logging.getLogger(__name__)

Factory = Callable[[], torch.nn.Module]

__all__ = ["RANDOM_PRESETS", "build_random_pipeline", "is_random_preset", "parameter_counts"]

# Fixed order of components; the index selects the component's RNG stream so that each
# component's weights depend only on (preset, seed), not on what was built before it.
_COMPONENT_ORDER: tuple[str, ...] = ("transformer", "vae", "clip_l", "clip_g", "t5")
_ENCODERS: tuple[str, ...] = ("clip_l", "clip_g", "t5")


def _component_seed(seed: int, index: int) -> int:
    # Spread (seed, component) pairs over distinct seeds; non-negative for torch.
    return (seed * 1_000_003 + index * 7_919) % (2**63 - 1)


@contextmanager
def _private_rng(device: torch.device) -> Iterator[None]:
    """Fork the RNGs that initialisation on ``device`` touches and restore them after.

    Callers' global RNG state (CPU and the target accelerator) is left untouched.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            yield
    else:
        # CPU and meta only use the CPU generator; devices=[] avoids touching CUDA.
        with torch.random.fork_rng(devices=[]):
            yield


def _seed(device: torch.device, seed: int) -> None:
    # torch.manual_seed would also (lazily) reseed every CUDA device, including ones
    # outside the fork, so seed only the generators that are forked.
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _finish(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to ``dtype`` like ``from_pretrained(torch_dtype=dtype)`` and freeze."""
    # torch.nn.Module.to directly: diffusers' ModelMixin.to warns on every dtype cast,
    # which is meaningless here (no quantization or offloading hooks to respect).
    torch.nn.Module.to(module, dtype=dtype)
    # transformers keeps some layers in fp32 when loading fp16 (T5's "wo" projections,
    # which overflow in fp16); match that so numerics and memory are the real ones.
    keep_fp32 = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.float16 and keep_fp32:
        for name, sub in module.named_modules():
            if keep_fp32.intersection(name.split(".")):
                sub.to(dtype=torch.float32)
    # Constructed modules start in train mode; T5 dropout would make outputs random.
    module.eval()
    module.requires_grad_(False)
    return module


def _factories(configs: dict[str, dict[str, Any]], tokenizers: tuple[Any, Any, Any]) -> dict[str, Factory]:
    """A constructor for each weight-bearing component of a preset, from its configs and its tokenizers."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_l_config = clip_config(configs["clip_l"], tokenizers[0])
    clip_g_config = clip_config(configs["clip_g"], tokenizers[1])
    t5_encoder_config = t5_config(configs["t5"], tokenizers[2])
    return {
        "transformer": lambda: SD3Transformer2DModel(**configs["transformer"]),
        "vae": lambda: AutoencoderKL(**configs["vae"], **VAE_COMMON),
        "clip_l": lambda: CLIPTextModelWithProjection(clip_l_config),
        "clip_g": lambda: CLIPTextModelWithProjection(clip_g_config),
        "t5": lambda: T5EncoderModel(t5_encoder_config),
    }


def _build_modules(
    factories: dict[str, Factory],
    device: torch.device,
    placed: dict[str, torch.device],
    seed: int,
    t5: bool,
    dtype: torch.dtype,
) -> dict[str, torch.nn.Module]:
    """Each component (T5 only with ``t5``) built on its device (``placed``, else ``device``) from its own seed."""
    modules: dict[str, torch.nn.Module] = {}
    with _private_rng(device):
        for index, component in enumerate(_COMPONENT_ORDER):
            if component == "t5" and not t5:
                continue
            where = placed.get(component, device)
            _seed(where, _component_seed(seed, index))
            # Allocating and initialising on the target device avoids a slow CPU init
            # and a host-to-device copy of the multi-GB presets.
            with torch.device(where):
                module = factories[component]()
            modules[component] = _finish(module, dtype)

    return modules


def build_random_pipeline(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    t5: bool = True,
    encoders_device: str | torch.device | None = None,
) -> StableDiffusion3Pipeline:
    """Build the ``random:`` preset ``name`` with seeded random weights.

    Modules are constructed directly on ``device`` (``"meta"`` allocates nothing) and
    then cast to ``dtype``. The same preset, seed and device type always give the same
    weights; the caller's global RNG state is preserved. ``t5=False`` leaves the T5 encoder and its tokenizer out
    (``text_encoder_3=None, tokenizer_3=None``, as diffusers documents for SD3); the other components keep their
    weights (each has its own RNG stream). ``encoders_device``: the text encoders are built there instead.
    """
    # Imported here so that importing this module (for is_random_preset) stays cheap.
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    check_preset(name)
    device = torch.device(device)
    placed = {name: torch.device(encoders_device) for name in _ENCODERS} if encoders_device else {}
    tokenizer = build_clip_tokenizer(pad_token="<|endoftext|>")
    # SD3 ships CLIP-G's tokenizer padding with "!" (id 0), as OpenCLIP does.
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    tokenizer_3 = build_t5_tokenizer()
    factories = _factories(PRESET_CONFIGS[name], (tokenizer, tokenizer_2, tokenizer_3))
    modules = _build_modules(factories, device, placed, seed, t5, dtype)

    pipe = StableDiffusion3Pipeline(
        transformer=modules["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=modules["vae"],
        text_encoder=modules["clip_l"],
        tokenizer=tokenizer,
        text_encoder_2=modules["clip_g"],
        tokenizer_2=tokenizer_2,
        text_encoder_3=modules.get("t5"),
        tokenizer_3=tokenizer_3 if t5 else None,
    )
    logger.log(
        logging.DEBUG if device.type == "meta" else logging.INFO,  # a meta build only counts (count_parameters)
        "Built %s (seed=%d) on %s as %s: %.1fM parameters",
        name,
        seed,
        device,
        dtype,
        sum(p.numel() for m in modules.values() for p in m.parameters()) / 1e6,
    )
    return pipe


def parameter_counts(name: str) -> dict[str, int]:
    """The number of weights of each component of the preset ``name``, counted on the meta device (allocates
    nothing; under a second even for random:sd3.5-medium)."""
    pipe = build_random_pipeline(name, device="meta")
    modules = {key: m for key, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    return {key: sum(p.numel() for p in m.parameters()) for key, m in modules.items()}
