"""Make a LoRA adapter for a model, offline: random weights with a visible effect, in diffusers' own format.

    python make_lora.py --model random:tiny --out loras/ink.safetensors --seed 1
    python make_lora.py --model random:tiny --out loras/neon --rank 8 --strength 0.5 --seed 2
    python make_lora.py --model ./my-sd35 --out loras/try.safetensors          # a save_pretrained directory

The model (a preset, a hub id in the cache, or a local directory) is loaded as the server loads it (Pipelines.py);
PEFT adds rank-``--rank`` LoRA layers to the attention projections of its transformer; both matrices are drawn at
random from ``--seed`` (PEFT's own start zeroes B: an adapter that changes nothing until it is trained), B scaled by
``--strength``; and the layers are written as ``StableDiffusion3Pipeline.save_lora_weights`` writes them, which is
what ``--lora`` and ``--lora-dir`` read. ``--out`` ending in ``.safetensors`` is the file; otherwise a folder, given
``pytorch_lora_weights.safetensors``. The adapter fits the model it was made for only, and is noise, not a style: it
shows that adapters reach the image (docs/features/lora.md).

Exit status: 0 when written; 1 when it cannot be written; 2 for bad arguments, or a model that cannot be loaded (the
reason and a hint on stderr).
This is a command for people, beside ``serverasync.py``: it loads a model through ``Pipelines.py`` and runs no server.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "main", "make_lora", "parse_args"]

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, the usual LoRA targets for SD3
ADAPTER = "made"  # the adapter's name while it exists on the transformer (the file keeps no name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make_lora.py",
        description="Write a random LoRA adapter with a visible effect for a model, in diffusers' format.",
    )
    parser.add_argument(
        "--model", required=True, help="random:tiny, random:sd3.5-medium, a hub id or a local directory"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="FILE.safetensors, or a folder (its pytorch_lora_weights.safetensors)"
    )
    parser.add_argument("--rank", type=_whole(1, 1024), default=4, help="the LoRA rank [default: %(default)s]")
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="scales B, and so the effect (0: none; negative: the opposite) [default: %(default)s]",
    )
    parser.add_argument("--seed", type=_whole(0, 2**63 - 1), default=0, help="the weights' seed [default: %(default)s]")
    parser.add_argument("--device", default=None, help="where to load the model: auto, cpu, cuda... [default: auto]")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 [default: the server's for it]")
    return parser.parse_args(argv)


def _whole(lowest: int, highest: int) -> Any:
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(f"must be {lowest} to {highest}, got {value}")
        return value

    return whole


def _target(out: Path) -> Path:
    return out if out.suffix == ".safetensors" else out / "pytorch_lora_weights.safetensors"


def _random_layers(state: dict[str, Any], rank: int, strength: float, seed: int) -> dict[str, Any]:
    """``state``'s LoRA matrices drawn again, from a CPU generator (the same file on any device): A as PEFT starts it
    (uniform within 1/sqrt(its inputs)), B uniform within strength/sqrt(rank): B·A then moves each projection's output
    by a share of its size that depends on neither the model's width nor the rank."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    drawn = {}
    for key in sorted(state):
        tensor = state[key]
        bound = 1 / math.sqrt(tensor.shape[1]) if "lora_A" in key else strength / math.sqrt(rank)
        values = (torch.rand(tuple(tensor.shape), generator=generator) * 2 - 1) * bound
        drawn[key] = values.to(tensor.dtype)
    return drawn


def make_lora(pipeline: Any, out: Path, rank: int = 4, strength: float = 1.0, seed: int = 0) -> Path:
    """Write a random LoRA for ``pipeline``'s transformer to ``out`` (see the module docstring); the file written.
    The pipeline is left as it was (the layers are added, read, and removed)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = pipeline.transformer
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS))
    transformer.add_adapter(config, adapter_name=ADAPTER)
    try:
        layers = _random_layers(get_peft_model_state_dict(transformer, adapter_name=ADAPTER), rank, strength, seed)
    finally:
        transformer.delete_adapters(ADAPTER)
    target = _target(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    type(pipeline).save_lora_weights(str(target.parent), transformer_lora_layers=layers, weight_name=target.name)
    umask = os.umask(0)  # the writer makes it private (0600); give it the modes any other new file gets here
    os.umask(umask)
    target.chmod(0o666 & ~umask)
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from Pipelines import ModelLoadError, TextToImagePipelineSD3, preflight, quiet_library_logs

    quiet_library_logs()
    try:
        preflight(args.model, args.device, args.dtype)
        pipeline = TextToImagePipelineSD3(args.model, device=args.device, dtype=args.dtype).start().pipeline
    except ModelLoadError as exc:
        print(f"make_lora.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        target = make_lora(pipeline, args.out, rank=args.rank, strength=args.strength, seed=args.seed)
    except OSError as exc:
        print(f"make_lora.py: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {target}: a rank-{args.rank} LoRA for {args.model} (seed {args.seed}, strength {args.strength:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
