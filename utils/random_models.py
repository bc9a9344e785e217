"""Randomly initialised Stable Diffusion 3 pipelines, built offline from configs.

The server accepts a model name of the form ``random:<preset>`` in place of a hub id
or a local directory. Such a name never touches the network or the disk: every
component (MMDiT transformer, VAE, both CLIP text encoders, the T5 encoder, the
scheduler and all three tokenizers) is constructed in memory from a config and
filled with seeded random weights. The images are noise, but every code path of
:class:`diffusers.StableDiffusion3Pipeline` runs exactly as with real weights.

Presets:

``random:tiny``
    About 360K parameters (1.4 MB in fp32). Same architecture as
    SD3.5-medium (dual-attention MMDiT blocks, RMS qk-norm, 16 latent channels,
    4-block VAE) with tiny widths and depths. Default size 64x64; any multiple of
    16 up to 1024x1024 works. For unit tests, CI and CPU-only development of the
    server: a 20-step 128x128 generation takes well under a second on a laptop CPU.

``random:sd3.5-medium``
    The exact shapes of stabilityai/stable-diffusion-3.5-medium: MMDiT-X with 2.24B
    parameters (2.47B weights counting its fixed position-embedding table, the
    advertised "2.5B"), CLIP-L (124M), CLIP-G (695M), T5-XXL encoder (4.76B) and
    the SD3 VAE (84M); 7.9B parameters in all. For benchmarking and memory planning
    on a GPU when the real weights are not available: compute and memory traffic
    match the real model (fp16 keeps T5's ``wo`` layers in fp32, as
    ``from_pretrained`` does). Build it with
    ``device="cuda"`` (initialisation then runs on the GPU) or ``device="meta"``
    (shapes only, nothing allocated).

Only the tokenizers are small stand-ins for both presets (the embedding tables keep
their real sizes): a byte-level BPE for the two CLIPs (every byte is in the
vocabulary, so any prompt tokenizes) and a unigram vocabulary for T5. They use the
real transformers classes, so a pipeline built here round-trips through
``save_pretrained`` / ``StableDiffusion3Pipeline.from_pretrained``.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5Tokenizer

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_PRESETS: tuple[str, ...] = ("random:tiny", "random:sd3.5-medium")

# CLIP's context length; SD3 reads it from tokenizer.model_max_length.
_CLIP_MAX_LENGTH = 77
# T5 accepts any length (relative position buckets); 512 is what SD3 checkpoints ship
# and keeps "longest" padding from warning for max_sequence_length up to 512.
_T5_MAX_LENGTH = 512
_T5_EXTRA_IDS = 100

# Words given their own tokens in the stand-in vocabularies, so that common prompts
# tokenize into roughly word-sized pieces as with the real tokenizers (anything else
# falls back to characters / bytes).
# fmt: off
_COMMON_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by", "photo", "picture",
    "painting", "portrait", "cat", "dog", "horse", "astronaut", "riding", "city",
    "sunset", "mountain", "forest", "river", "beach", "red", "blue", "green", "style",
    "high", "quality", "detailed", "realistic", "art",
)
# fmt: on

# Per-preset component configs. Entries that depend on the tokenizers (vocab sizes and
# special token ids) are filled in by the builder.
_PRESET_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "random:tiny": {
        "transformer": {
            # 8 latent pixels * VAE factor 8 -> 64x64 default image size.
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            # Must equal the T5 d_model: CLIP states are zero-padded up to it.
            "joint_attention_dim": 64,
            # Must equal heads * head_dim (the context stream runs at inner width).
            "caption_projection_dim": 32,
            # Must equal projection_dim(CLIP-L) + projection_dim(CLIP-G).
            "pooled_projection_dim": 64,
            # 64 patches of 2 latent pixels of 8 image pixels: up to 1024x1024.
            "pos_embed_max_size": 64,
            # Exercise the SD3.5 code paths (MMDiT-X dual attention, qk RMSNorm).
            "dual_attention_layers": (0,),
            "qk_norm": "rms_norm",
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (8, 16, 16, 16),
            "layers_per_block": 1,
            "latent_channels": 16,
            "norm_num_groups": 4,
            "sample_size": 64,
        },
        "clip_l": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
        },
        "clip_g": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "hidden_act": "gelu",
        },
        "t5": {
            # >= hidden_size(CLIP-L) + hidden_size(CLIP-G), see joint_attention_dim.
            "d_model": 64,
            "d_ff": 128,
            "d_kv": 16,
            "num_heads": 4,
            "num_layers": 2,
        },
    },
    "random:sd3.5-medium": {
        # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        "transformer": {
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 384,
            "dual_attention_layers": tuple(range(13)),
            "qk_norm": "rms_norm",
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 16,
            "norm_num_groups": 32,
            "sample_size": 1024,
        },
        # OpenAI CLIP ViT-L/14 text tower.
        "clip_l": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        # OpenCLIP ViT-bigG/14 text tower.
        "clip_g": {
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "hidden_act": "gelu",
        },
        # google/t5-v1_1-xxl encoder.
        "t5": {
            "vocab_size": 32128,
            "d_model": 4096,
            "d_ff": 10240,
            "d_kv": 64,
            "num_heads": 64,
            "num_layers": 24,
        },
    },
}

# Settings shared by every preset (they are what SD3 checkpoints ship).
_VAE_COMMON: dict[str, Any] = {
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    # SD3's VAE maps straight between 16-channel latents and the 1x1-conv-free trunk.
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
_T5_COMMON: dict[str, Any] = {
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# Fixed order of components; the index selects the component's RNG stream so that each
# component's weights depend only on (preset, seed), not on what was built before it.
_COMPONENT_ORDER: tuple[str, ...] = ("transformer", "vae", "clip_l", "clip_g", "t5")


def is_random_preset(name: str) -> bool:
    """Whether ``name`` asks for a random model (``random:...``), valid or not."""
    return name.startswith(RANDOM_PREFIX)


def _check_preset(name: str) -> None:
    if name not in _PRESET_CONFIGS:
        raise ValueError(f"Unknown random model preset {name!r}; valid presets are: {', '.join(RANDOM_PRESETS)}")


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


def _word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that join each word left to right into an end-of-word token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    # Longer words first, so their merges outrank those of words they contain ("at"
    # in "cat"); a few words may still split where chains collide, which is harmless.
    for word in sorted(words, key=len, reverse=True):
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left += right
    return merges


def _build_clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A small byte-level BPE with the real CLIP layout and special tokens.

    Ids 0-255 are the byte alphabet in the same order as OpenAI's vocabulary, then the
    same with the ``</w>`` end-of-word suffix, then merged words, and the start/end
    tokens last (as 49406/49407 are in the real one).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # Sorted by code point this is exactly CLIP's bytes_to_unicode order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = _word_merges(_COMMON_WORDS)
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=_CLIP_MAX_LENGTH,
    )


def _build_t5_tokenizer() -> T5Tokenizer:
    """A small unigram vocabulary with the real T5 layout and special tokens.

    ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then pieces, then ``<extra_id_99>`` ..
    ``<extra_id_0>`` at the end like the sentencepiece model.
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁", -3.0),
    ]
    # Whole words are cheaper than their spellings, so the unigram model prefers them.
    pieces += [("▁" + word, -4.0) for word in _COMMON_WORDS]
    pieces += [("▁" + c, -6.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(c, -8.0) for c in string.ascii_letters + string.digits + string.punctuation]
    # Keep the first (cheapest) entry of pieces listed twice, e.g. "▁a".
    scores: dict[str, float] = {}
    for piece, score in pieces:
        scores.setdefault(piece, score)
    vocab = list(scores.items())
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_EXTRA_IDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=_T5_EXTRA_IDS, model_max_length=_T5_MAX_LENGTH)


def _clip_config(spec: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    kwargs: dict[str, Any] = {"vocab_size": len(tokenizer), **spec}
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError("CLIP vocab_size is smaller than the tokenizer's vocabulary")
    return CLIPTextConfig(
        **kwargs,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        layer_norm_eps=1e-5,
        # CLIPTextTransformer pools at the first eos_token_id in the input ids (any
        # value but the legacy 2), so it must be the tokenizer's real eos id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(spec: dict[str, Any], tokenizer: T5Tokenizer) -> T5Config:
    from transformers import T5Config

    kwargs: dict[str, Any] = {"vocab_size": len(tokenizer), **spec}
    if kwargs["vocab_size"] < len(tokenizer):
        raise ValueError("T5 vocab_size is smaller than the tokenizer's vocabulary")
    return T5Config(
        **kwargs,
        **_T5_COMMON,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


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


def build_random_pipeline(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> StableDiffusion3Pipeline:
    """Build the ``random:`` preset ``name`` with seeded random weights.

    Modules are constructed directly on ``device`` (``"meta"`` allocates nothing) and
    then cast to ``dtype``. The same preset, seed and device type always give the same
    weights; the caller's global RNG state is preserved.
    """
    # Imported here so that importing this module (for is_random_preset) stays cheap.
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    _check_preset(name)
    configs = _PRESET_CONFIGS[name]
    device = torch.device(device)

    tokenizer = _build_clip_tokenizer(pad_token="<|endoftext|>")
    # SD3 ships CLIP-G's tokenizer padding with "!" (id 0), as OpenCLIP does.
    tokenizer_2 = _build_clip_tokenizer(pad_token="!")
    tokenizer_3 = _build_t5_tokenizer()

    clip_l_config = _clip_config(configs["clip_l"], tokenizer)
    clip_g_config = _clip_config(configs["clip_g"], tokenizer_2)
    t5_config = _t5_config(configs["t5"], tokenizer_3)
    factories: dict[str, Callable[[], torch.nn.Module]] = {
        "transformer": lambda: SD3Transformer2DModel(**configs["transformer"]),
        "vae": lambda: AutoencoderKL(**configs["vae"], **_VAE_COMMON),
        "clip_l": lambda: CLIPTextModelWithProjection(clip_l_config),
        "clip_g": lambda: CLIPTextModelWithProjection(clip_g_config),
        "t5": lambda: T5EncoderModel(t5_config),
    }
    modules: dict[str, torch.nn.Module] = {}
    with _private_rng(device):
        for index, component in enumerate(_COMPONENT_ORDER):
            _seed(device, _component_seed(seed, index))
            # Allocating and initialising on the target device avoids a slow CPU init
            # and a host-to-device copy of the multi-GB presets.
            with torch.device(device):
                module = factories[component]()
            modules[component] = _finish(module, dtype)

    pipe = StableDiffusion3Pipeline(
        transformer=modules["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=modules["vae"],
        text_encoder=modules["clip_l"],
        tokenizer=tokenizer,
        text_encoder_2=modules["clip_g"],
        tokenizer_2=tokenizer_2,
        text_encoder_3=modules["t5"],
        tokenizer_3=tokenizer_3,
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
