"""Random-weight LoRA adapters for the tiny model, made offline by ``make_lora.py`` (PEFT, saved in diffusers' format:
what ``StableDiffusion3Pipeline.save_lora_weights`` writes), and diffusers' own reference for a set of them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch


def fresh_tiny() -> Any:
    """A new random:tiny pipeline (the session's shared one must never get adapters: they change its modules)."""
    from Pipelines import TextToImagePipelineSD3

    return TextToImagePipelineSD3("random:tiny", device="cpu").start().pipeline


def make_adapter(folder: Path, seed: int, rank: int = 4, scale: float = 1.0) -> Path:
    """Save one random LoRA (rank ``rank``, every attention projection) for random:tiny in ``folder``; its file.

    The shipped command's own maker (``make_lora.py``): both matrices random (PEFT's default zeroes B: no effect at
    all), ``scale`` its ``--strength``, so adapters change the image visibly, each differently."""
    from make_lora import make_lora

    return make_lora(fresh_tiny(), folder, rank=rank, strength=scale, seed=seed)


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
