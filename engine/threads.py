"""The threads strategy's runner: one whole diffusers pipeline call per admitted request, in its slot thread.

Which pipeline is called, and with which of the task's own arguments, is the request's task's to say
(``engine.tasks``): text-to-image calls the loaded ``StableDiffusion3Pipeline``; a task whose pipeline is another
class (image-to-image, inpainting) gets that class built once over the loaded pipeline's components
(the same weight objects, nothing copied or cast) and a request-scoped view of it per request.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch

from utils import RequestScopedPipeline

from .prompt_cache import PromptCache, encode_texts, is_guided, request_embeddings
from .tasks import get_task
from .types import GenerationRequest, Runner, StepCallback

__all__ = ["TaskPipelines", "pipeline_runner"]


class TaskPipelines:
    """The ``RequestScopedPipeline`` each task's pipeline class runs on, all over the loaded pipeline's weights."""

    def __init__(self, scoped: RequestScopedPipeline) -> None:
        self.scoped = scoped
        self._by_class: dict[str, RequestScopedPipeline] = {}
        # Protects _by_class: two slot threads asking for a new class at once must build it once, not twice.
        self._lock = threading.Lock()

    def get(self, class_name: str) -> RequestScopedPipeline:
        """The scoped pipeline of diffusers' ``class_name``: the loaded one when it is of that class (or a subclass),
        else one built on first use from the loaded one's components."""
        with self._lock:
            found = self._by_class.get(class_name)
            if found is None:
                import diffusers

                cls = getattr(diffusers, class_name)
                if isinstance(self.scoped.pipeline, cls):
                    found = self.scoped
                else:
                    pipeline = _same_components(cls, self.scoped.pipeline)
                    # The same tokenizer objects as the loaded pipeline's, so the same lock must guard them.
                    found = RequestScopedPipeline(pipeline, tokenizer_lock=self.scoped.tokenizer_lock)
                self._by_class[class_name] = found
            return found


def _same_components(cls: type, base: Any) -> Any:
    """A pipeline of class ``cls`` holding ``base``'s own components (the same objects).

    Not ``cls.from_pipe(base)``: it ends with ``.to(dtype)``, float32 unless told otherwise, which casts the shared
    modules in place (a bfloat16 model would be turned into float32 under every request), and even with the loaded
    dtype it would cast the modules kept in float32 on purpose (T5's ``wo`` layers in a float16 load)."""
    accepted = inspect.signature(cls.__init__).parameters
    pipeline = cls(**{name: module for name, module in base.components.items() if name in accepted})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_runner(scoped: Any, device: Any = None, prompt_cache: PromptCache | None = None) -> Runner:
    """A runner that generates with ``scoped`` (a RequestScopedPipeline), one view per request: the threads strategy.

    The generator lives on the CPU: the same seed then gives the same starting noise on every device. With a
    ``prompt_cache`` (capacity > 0) the embeddings come from it and the pipeline skips its text encoders.
    """
    pipelines = TaskPipelines(scoped)
    # Encodes cache misses in the calling slot thread; its tokenizers are locked, so slots may share it.
    encoder_view = scoped.make_view() if prompt_cache is not None and prompt_cache.capacity > 0 else None

    def run(request: GenerationRequest, on_step: StepCallback) -> list[Any]:
        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step, tensors.get("latents"))  # the pipeline hands its latents by default
            return {}

        task = get_task(request.task)
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
        output = pipelines.get(task.pipeline_class).generate(
            num_inference_steps=request.num_inference_steps,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            callback_on_step_end=callback,
            output_type="pil",
            device=device,
            **kwargs,
        )
        return list(output.images)

    return run


def _cached_embeddings(cache: Any, view: Any, request: GenerationRequest, device: Any) -> dict[str, Any]:
    """The pipeline's embedding arguments for ``request``, from the prompt cache (laid out as encode_prompt would)."""

    def encode(texts: list[str]) -> list[Any]:
        return encode_texts(view, texts, device)

    # The prompt and the negative prompt are encoded apart (batch 1 each), as the pipeline encodes them, so the
    # embeddings are bit-identical to the pipeline's own.
    n = request.num_images
    embeds, pooled = request_embeddings(cache.get([request.prompt], encode)[0], None, n)
    kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if is_guided(request):
        negative_text = cache.get([request.negative_prompt or ""], encode)[0]
        negative, negative_pooled = request_embeddings(negative_text, None, n)
        kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return kwargs
