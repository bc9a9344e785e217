"""The threads strategy's runner: one whole diffusers pipeline call per admitted request, in its slot thread.

Which pipeline is called, and with which of the task's own arguments, is the request's task's to say
(``engine.tasks``): text-to-image calls the loaded ``StableDiffusion3Pipeline``; a task whose pipeline is another
class (image-to-image) gets that class built once over the loaded pipeline's components
(``engine.tasks.TaskPipelines``: the same weight objects, nothing copied or cast) and a request-scoped view of it per
request.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .adapters import AdapterPool
from .prompt_cache import PromptCache, encode_texts, encoders_device, is_guided, request_embeddings
from .tasks import TaskPipelines, get_task, refuse_unavailable
from .types import GenerationRequest, Runner, StepCallback, Tiling, no_tiling

__all__ = ["pipeline_runner"]


def pipeline_runner(
    scoped: Any,
    device: Any = None,
    prompt_cache: PromptCache | None = None,
    adapters: AdapterPool | None = None,
    tiles: Tiling = no_tiling,
) -> Runner:
    """A runner that generates with ``scoped`` (a RequestScopedPipeline), one view per request: the threads strategy.

    The generator lives on the CPU: the same seed then gives the same starting noise on every device. With a
    ``prompt_cache`` (capacity > 0) the embeddings come from it and the pipeline skips its text encoders. With
    ``adapters``, the slot thread binds its request's LoRA set around the call: every transformer pass of the call
    then passes the pool's gate with it (``engine.adapters``). ``tiles(width, height)``: whether the request's VAE
    decodes in tiles (its view's, ``TiledVAE``). Text encoders on another device than ``device`` (``--encoders-device``)
    always encode through the cache's path (capacity 0: a pass-through), whose embeddings move to ``device``: the
    pipeline's own encoding would hand the encoders inputs on the wrong device.
    """
    pipelines = TaskPipelines(scoped)
    encoders = encoders_device(scoped.pipeline)
    elsewhere = device is not None and encoders is not None and not _same_device(encoders, torch.device(device))
    if elsewhere and (prompt_cache is None or prompt_cache.capacity == 0):
        prompt_cache = PromptCache(0)
    # Encodes cache misses in the calling slot thread; its tokenizers are locked, so slots may share it.
    cached = prompt_cache is not None and (prompt_cache.capacity > 0 or elsewhere)
    encoder_view = scoped.make_view() if cached else None

    def run(request: GenerationRequest, on_step: StepCallback) -> list[Any]:
        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step, tensors.get("latents"))  # the pipeline hands its latents by default
            return {}

        task = get_task(request.task)
        refuse_unavailable(task, scoped.pipeline)  # before any work: a ValueError naming the reason
        kwargs = task.pipeline_arguments(request)
        if request.guidance_scale is not None:
            kwargs["guidance_scale"] = request.guidance_scale
        if encoder_view is not None:
            # Embeddings already hold one row per image: the pipeline does not repeat given embeddings.
            kwargs.update(_cached_embeddings(prompt_cache, encoder_view, request, device), num_images_per_prompt=1)
        else:
            kwargs.update(
                prompt=request.prompt, negative_prompt=request.negative_prompt, num_images_per_prompt=request.num_images
            )
        with _adapters_bound(adapters, request):
            kwargs["vae_tiling"] = tiles(request.width, request.height)
            output = _call(pipelines.get(task.pipeline_class), request, callback, device, kwargs)
        return task.finish_images(request, list(output.images))

    return run


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device (a module's parameters name the index, a resolved device may not)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _call(pipeline: Any, request: GenerationRequest, callback: Any, device: Any, kwargs: dict[str, Any]) -> Any:
    return pipeline.generate(
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        callback_on_step_end=callback,
        output_type="pil",
        device=device,
        **kwargs,
    )


def _adapters_bound(adapters: AdapterPool | None, request: GenerationRequest) -> Any:
    if adapters is not None:
        return adapters.bound(request.loras)
    if request.loras:
        raise ValueError("this server has no LoRA adapters (--lora, --lora-dir)")
    return contextlib.nullcontext()


def _cached_embeddings(cache: Any, view: Any, request: GenerationRequest, device: Any) -> dict[str, Any]:
    """The pipeline's embedding arguments for ``request``, from the prompt cache (laid out as encode_prompt would)."""

    def encode(texts: list[str]) -> list[Any]:
        return encode_texts(view, texts, device)

    # The prompt and the negative prompt are encoded apart (batch 1 each), as the pipeline encodes them, so the
    # embeddings are bit-identical to the pipeline's own.
    n = request.num_images
    embeds, pooled = request_embeddings(cache.get([request.prompt], encode)[0], None, n, device)
    kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if is_guided(request):
        negative_text = cache.get([request.negative_prompt or ""], encode)[0]
        negative, negative_pooled = request_embeddings(negative_text, None, n, device)
        kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return kwargs
