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

``random:small``
    A mid-size stand-in for measuring memory and speed on a CPU: a 58M-parameter transformer (the SD3.5 block
    design at 512 wide, 6 blocks; 233 MB in fp32), a 4M-parameter VAE whose tiles are 256x256 (so tiled decoding
    matters from 512x512 up), and small text encoders. Default size 256x256. Big enough that its weights, not the
    interpreter, dominate the process's memory (bench/small_memory.py measures quantization on it).

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

``random:encoder-heavy`` (not advertised: not in ``RANDOM_PRESETS``; the family of several models in tests/model_dirs.py
and bench/several_models.py)
    Shaped like SD3.5-medium, whose text encoders outweigh its transformer (5.6B parameters beside 2.24B), at about
    1/180 of its size: text encoders of 30M parameters (T5 25M) beside a 10M transformer, and the VAE of
    ``random:small``; 44M in all (174 MB in fp32). Models that share their encoders and VAE share most of their
    memory, as SD3.5-large and -medium do.

This module is the presets' names and configs (light: no torch); ``models.random_build`` builds them and
``models.random_tokenizers`` makes their stand-in tokenizers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PRESET_CONFIGS",
    "RANDOM_PREFIX",
    "RANDOM_PRESETS",
    "SCHEDULER_CONFIG",
    "VAE_COMMON",
    "check_preset",
    "is_random_preset",
]

RANDOM_PREFIX = "random:"
RANDOM_PRESETS: tuple[str, ...] = ("random:tiny", "random:small", "random:sd3.5-medium")

# Per-preset component configs. Entries that depend on the tokenizers (vocab sizes and
# special token ids) are filled in by the builder.
PRESET_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
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
    "random:small": {
        "transformer": {
            # 32 latent pixels * VAE factor 8 -> 256x256 default image size.
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 6,
            "attention_head_dim": 64,
            "num_attention_heads": 8,
            "joint_attention_dim": 256,
            "caption_projection_dim": 512,
            "pooled_projection_dim": 128,
            # 96 patches of 16 image pixels: up to 1536x1536.
            "pos_embed_max_size": 96,
            "dual_attention_layers": (0, 1),
            "qk_norm": "rms_norm",
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (32, 64, 128, 128),
            "layers_per_block": 1,
            "latent_channels": 16,
            "norm_num_groups": 16,
            # The tile diffusers' tiled decoding cuts: 256x256 pixels.
            "sample_size": 256,
        },
        "clip_l": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 64,
            "hidden_act": "quick_gelu",
        },
        "clip_g": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 64,
            "hidden_act": "gelu",
        },
        "t5": {"d_model": 256, "d_ff": 1024, "d_kv": 32, "num_heads": 8, "num_layers": 4},
    },
    "random:encoder-heavy": {
        "transformer": {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 4,
            "attention_head_dim": 64,
            "num_attention_heads": 4,
            "joint_attention_dim": 512,
            "caption_projection_dim": 256,
            "pooled_projection_dim": 128,
            "pos_embed_max_size": 64,
            "dual_attention_layers": (0, 1),
            "qk_norm": "rms_norm",
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (32, 64, 128, 128),
            "layers_per_block": 1,
            "latent_channels": 16,
            "norm_num_groups": 16,
            "sample_size": 256,
        },
        "clip_l": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "projection_dim": 64,
            "hidden_act": "quick_gelu",
        },
        "clip_g": {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "projection_dim": 64,
            "hidden_act": "gelu",
        },
        "t5": {"d_model": 512, "d_ff": 2048, "d_kv": 64, "num_heads": 8, "num_layers": 6},
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
VAE_COMMON: dict[str, Any] = {
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    # SD3's VAE maps straight between 16-channel latents and the 1x1-conv-free trunk.
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


def is_random_preset(name: str) -> bool:
    """Whether ``name`` asks for a random model (``random:...``), valid or not."""
    return name.startswith(RANDOM_PREFIX)


def check_preset(name: str) -> None:
    if name not in PRESET_CONFIGS:
        raise ValueError(f"Unknown random model preset {name!r}; valid presets are: {', '.join(RANDOM_PRESETS)}")
