"""Random-weight LoRA adapters for the tiny model, made offline with ``peft`` and saved in diffusers' format (what
``StableDiffusion3Pipeline.save_lora_weights`` writes), and diffusers' own reference for a set of them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def fresh_tiny() -> Any:
    """A new random:tiny pipeline (the session's shared one must never get adapters: they change its modules)."""
    from Pipelines import TextToImagePipelineSD3

    return TextToImagePipelineSD3("random:tiny", device="cpu").start().pipeline


def make_adapter(folder: Path, seed: int, rank: int = 4, scale: float = 1.0) -> Path:
    """Save one random LoRA (rank ``rank``, every attention projection) for random:tiny in ``folder``; its file.

    ``init_lora_weights=False`` gives both matrices random values (PEFT's default zeroes B: no effect at all), and
    ``scale`` multiplies B, so adapters change the image visibly, each differently."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = fresh_tiny().transformer
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
    transformer.add_adapter(config, adapter_name="made")
    state = get_peft_model_state_dict(transformer, adapter_name="made")
    state = {k: v * scale if "lora_B" in k else v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=state)
    return folder / "pytorch_lora_weights.safetensors"


def reference_images(
    adapters: dict[str, Path],
    chosen: tuple[tuple[str, float], ...],
    pipeline_class: str = "StableDiffusion3Pipeline",
    threads: int | None = None,
    **call: Any,
) -> list[Any]:
    """What diffusers gives for ``chosen`` ((name, scale), ...): a fresh ``pipeline_class`` over a fresh tiny
    pipeline's components, ``load_lora_weights`` for each adapter, ``set_adapters(names, scales)``, a CPU generator
    seeded with ``call['seed']``; in a thread of its own with ``threads`` OpenMP threads when given (a server's
    slot's share of the cores: the thread count changes the order of float sums)."""
    import diffusers

    pipe = getattr(diffusers, pipeline_class)(**fresh_tiny().components)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in chosen:
        pipe.load_lora_weights(str(adapters[name]), adapter_name=name)
    if chosen:
        pipe.set_adapters([n for n, _ in chosen], [s for _, s in chosen])
    seed = call.pop("seed")

    def run() -> list[Any]:
        if threads is not None:
            torch.set_num_threads(threads)
        return list(pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **call).images)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()
