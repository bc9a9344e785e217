"""GPU options (serial-opt arm), applied once at load, before any request: nothing here changes per request.

Also the FLOP estimate (the physical floor), from the model's configs on the meta device: nothing is allocated.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from .common import log


class FusedJointAttnProcessor:
    """SD3 / SD3.5 joint attention with fused QKV projections.

    diffusers' own ``fuse_qkv_projections()`` (0.42) installs ``FusedJointAttnProcessor2_0``, which skips the
    qk RMSNorm of SD3.5 (different images) and fails on its MMDiT-X self-attention (``attn2``, no context). This
    one mirrors ``JointAttnProcessor2_0`` exactly, with one projection where it has three.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual name

        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        head_dim = key.shape[-1] // attn.heads

        def split_heads(t: Any) -> Any:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = split_heads(query), split_heads(key), split_heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            c_query, c_key, c_value = (split_heads(t) for t in attn.to_added_qkv(encoder_hidden_states).chunk(3, -1))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def fuse_qkv(transformer: Any) -> int:
    """Fuse every attention's Q, K, V (and context Q, K, V) projections; return how many modules changed.

    The separate projections are deleted afterwards, so the weights are held once.
    """
    from diffusers.models.attention_processor import Attention

    fused = 0
    for module in transformer.modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        module.fuse_projections(fuse=True)
        unused = ["to_q", "to_k", "to_v"]
        if getattr(module, "to_added_qkv", None) is not None:
            unused += ["add_q_proj", "add_k_proj", "add_v_proj"]
        for name in unused:
            delattr(module, name)
        module.set_processor(FusedJointAttnProcessor())
        fused += 1
    return fused


SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")


def sdpa_backend_context(name: str) -> contextlib.AbstractContextManager[Any]:
    """Restrict torch's scaled_dot_product_attention to one backend.

    SD3's attention processors call torch's SDPA directly, so this (not diffusers' ``set_attention_backend``,
    which SD3's processors ignore in diffusers 0.42) is what picks the kernel. The flags are process-global, not
    per thread: a server must set them once at start, never per request.
    """
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])


def apply_options(pipe: Any, args: argparse.Namespace) -> list[str]:
    """Apply --fuse-qkv and --compile to a loaded pipeline; return what was done, for the report."""
    done: list[str] = []
    if args.fuse_qkv:
        done.append(f"fused QKV in {fuse_qkv(pipe.transformer)} attention modules")
    if args.compile:
        # In place (nn.Module.compile), so the pipeline keeps its transformer object and config. Compilation is
        # not thread-safe: here one thread warms it up before any timed request.
        pipe.transformer.compile(mode=args.compile_mode, fullgraph=False)
        done.append(f"torch.compile(transformer, mode={args.compile_mode})")
    if args.attention_backend != "default":
        done.append(f"SDPA backend {args.attention_backend}")
    return done


def options_given(args: argparse.Namespace) -> bool:
    return bool(args.fuse_qkv or args.compile or args.attention_backend != "default")


# ---------------------------------------------------------------------------------------------------------
# FLOP estimate (the physical floor), from the model's configs on the meta device: nothing is allocated.
# ---------------------------------------------------------------------------------------------------------


def estimate_flops(pipe: Any, size: int, steps: int, cfg: bool = True) -> float | None:
    """FLOPs of one image: text encoders (prompt and negative), ``steps`` transformer passes, one VAE decode."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        batch = 2 if cfg else 1
        latent = size // int(getattr(pipe, "vae_scale_factor", 8))
        with torch.device("meta"):
            transformer = type(pipe.transformer).from_config(pipe.transformer.config)
            vae = type(pipe.vae).from_config(pipe.vae.config)
            encoders = [
                (type(enc)(enc.config), length)
                for enc, length in (
                    (pipe.text_encoder, 77),
                    (pipe.text_encoder_2, 77),
                    (pipe.text_encoder_3, 256),  # the pipeline's default max_sequence_length
                )
                if enc is not None
            ]
        total = 0.0
        tc = transformer.config
        with torch.no_grad():
            for enc, length in encoders:
                ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
                with FlopCounterMode(display=False) as counter:
                    enc(ids)
                total += counter.get_total_flops()
            context = 77 + 256
            with FlopCounterMode(display=False) as counter:
                transformer(
                    hidden_states=torch.empty(batch, tc.in_channels, latent, latent, device="meta"),
                    encoder_hidden_states=torch.empty(batch, context, tc.joint_attention_dim, device="meta"),
                    pooled_projections=torch.empty(batch, tc.pooled_projection_dim, device="meta"),
                    timestep=torch.empty(batch, device="meta"),
                )
            total += steps * counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                vae.decode(torch.empty(1, vae.config.latent_channels, latent, latent, device="meta"))
            total += counter.get_total_flops()
        return total
    except Exception as exc:  # noqa: BLE001 - an estimate is a nicety; the benchmark goes on without it
        log(f"FLOP estimate unavailable: {type(exc).__name__}: {exc}")
        return None
