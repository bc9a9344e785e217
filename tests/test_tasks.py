"""The task seam (engine/tasks): both runners ask the request's task, and only it, what differs between tasks.

- text-to-image's start is exactly the pipeline's own preparation (latents and timesteps, with and without the
  resolution-dependent shift);
- the threads runner calls the pipeline class a task names, with the task's arguments, built over the loaded
  pipeline's weights (an image-to-image probe task: its images equal diffusers' own img2img pipeline's);
- the step runner starts from the task's ``Start`` and applies its ``after_step`` after every scheduler step,
  before the request's step callback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from PIL import Image

from engine import GenerationRequest
from engine.step import StepRunner
from engine.tasks import DEFAULT_TASK, TASKS, Start, Task, TextToImage, get_task
from engine.threads import TaskPipelines, pipeline_runner
from utils import RequestScopedPipeline

CPU = torch.device("cpu")


def _request(task: str = DEFAULT_TASK, steps: int = 4, seed: int = 11, size: int = 32) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red fox in the snow",
        num_inference_steps=steps,
        num_images=1,
        seed=seed,
        height=size,
        width=size,
        task=task,
    )


def _pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


@pytest.fixture
def register() -> Iterator[Any]:
    """Registers tasks for one test (as a new room would register itself), and removes them after."""
    added: list[str] = []

    def add(task: Task) -> Task:
        TASKS[task.name] = task
        added.append(task.name)
        return task

    yield add
    for name in added:
        TASKS.pop(name, None)


def test_requests_are_text_to_image_unless_they_name_another_task() -> None:
    assert _request().task == DEFAULT_TASK == "text-to-image"
    assert isinstance(get_task(DEFAULT_TASK), TextToImage)
    with pytest.raises(ValueError, match="unknown task 'sketch-to-image'; known tasks: text-to-image"):
        get_task("sketch-to-image")


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed-shift", "dynamic-shift"])
def test_text_to_image_starts_exactly_where_the_pipeline_starts(tiny_pipeline: Any, dynamic: bool) -> None:
    """The starting noise and every timestep equal what StableDiffusion3Pipeline itself uses for the same seed."""
    config = {k: v for k, v in tiny_pipeline.scheduler.config.items() if not k.startswith("_")}
    scheduler = FlowMatchEulerDiscreteScheduler(**{**config, "use_dynamic_shifting": dynamic})
    pipe = StableDiffusion3Pipeline(**{**tiny_pipeline.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    request = _request(size=48)
    seen: dict[str, Any] = {"timesteps": []}

    def record(p: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen["timesteps"].append(float(timestep))
        return {}

    original = pipe.prepare_latents

    def prepare_latents(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen["latents"] = original(*args, **kwargs).clone()
        return seen["latents"]

    pipe.prepare_latents = prepare_latents  # the pipeline's own latents, as it makes them
    pipe(
        prompt=request.prompt,
        num_inference_steps=request.num_inference_steps,
        height=request.height,
        width=request.width,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        callback_on_step_end=record,
        output_type="latent",
    )
    view = RequestScopedPipeline(pipe).make_view()
    start = get_task(request.task).start(view, request, torch.float32, CPU)
    assert torch.equal(start.latents, seen["latents"])
    assert start.timesteps.tolist() == pytest.approx(seen["timesteps"], abs=0)
    assert start.after_step is None
    if dynamic:  # the shift depends on the resolution there: a sanity check that the case differs
        fixed = StableDiffusion3Pipeline(**tiny_pipeline.components)
        other = get_task(request.task).start(RequestScopedPipeline(fixed).make_view(), request, torch.float32, CPU)
        assert not torch.equal(other.timesteps, start.timesteps)


class _ImageToImageProbe(Task):
    """A task whose pipeline is another diffusers class: what the threads runner must call, over the same weights."""

    name = "test-image-to-image"
    pipeline_class = "StableDiffusion3Img2ImgPipeline"

    def __init__(self, image: Image.Image, strength: float) -> None:
        self.image, self.strength = image, strength

    def pipeline_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        return {"image": self.image, "strength": self.strength}

    def start(self, view: Any, request: GenerationRequest, dtype: torch.dtype, device: torch.device) -> Start:
        raise AssertionError("the threads runner must not ask for a step-engine start")


def test_the_threads_runner_calls_the_pipeline_class_the_task_names(tiny_pipeline: Any, register: Any) -> None:
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    task = register(_ImageToImageProbe(init, strength=0.6))
    request = _request(task=task.name, steps=5)
    got = pipeline_runner(RequestScopedPipeline(tiny_pipeline), CPU)(request, lambda step, latents=None: None)

    reference = StableDiffusion3Img2ImgPipeline.from_pipe(tiny_pipeline)
    reference.set_progress_bar_config(disable=True)
    want = reference(
        prompt=request.prompt,
        image=init,
        strength=0.6,
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images
    assert np.array_equal(_pixels(got), _pixels(want))
    # Not a text-to-image image in disguise: the init image changed the result.
    text = pipeline_runner(RequestScopedPipeline(tiny_pipeline), CPU)(_request(steps=5), lambda s, latents=None: None)
    assert not np.array_equal(_pixels(got), _pixels(text))


def test_task_pipelines_share_the_loaded_weights_and_build_each_class_once(tiny_pipeline: Any) -> None:
    scoped = RequestScopedPipeline(tiny_pipeline)
    pipelines = TaskPipelines(scoped)
    assert pipelines.get("StableDiffusion3Pipeline") is scoped  # the loaded pipeline is that class already
    img2img = pipelines.get("StableDiffusion3Img2ImgPipeline")
    assert isinstance(img2img.pipeline, StableDiffusion3Img2ImgPipeline)
    assert pipelines.get("StableDiffusion3Img2ImgPipeline") is img2img
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer"):
        assert getattr(img2img.pipeline, name) is getattr(tiny_pipeline, name), name
    assert img2img.tokenizer_lock is scoped.tokenizer_lock  # the same tokenizers, so the same lock


class _RecordingTextToImage(TextToImage):
    """Text-to-image with an after_step that records each call and hands on a new tensor of the same values."""

    name = "test-recording"

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []

    def start(self, view: Any, request: GenerationRequest, dtype: torch.dtype, device: torch.device) -> Start:
        start = super().start(view, request, dtype, device)

        def after_step(step: int, latents: torch.Tensor) -> torch.Tensor:
            handed = latents.clone()
            self.calls.append((step, handed))
            return handed

        return Start(start.latents, start.timesteps, after_step)


def test_the_step_runner_starts_from_the_task_and_applies_its_after_step(tiny_pipeline: Any, register: Any) -> None:
    task = register(_RecordingTextToImage())
    seen: list[tuple[int, torch.Tensor]] = []
    runner = StepRunner(RequestScopedPipeline(tiny_pipeline), CPU)
    try:
        got = runner(_request(task=task.name), lambda step, latents=None: seen.append((step, latents)))
        plain = runner(_request(), lambda step, latents=None: None)
    finally:
        runner.close()
    assert [step for step, _ in task.calls] == [0, 1, 2, 3]
    # The request's step callback sees what after_step returned, step by step.
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    assert all(a is b for (_, a), (_, b) in zip(task.calls, seen, strict=True))
    # Same values handed on, so the same image as plain text-to-image.
    assert np.array_equal(_pixels(got), _pixels(plain))


def test_a_task_pipeline_leaves_the_shared_weights_in_their_dtype() -> None:
    """diffusers' from_pipe casts the shared modules to float32 unless told otherwise; a task's pipeline class built
    over a bfloat16 model must leave every weight as it was (one copy, in the loaded dtype)."""
    from models.random_build import build_random_pipeline

    pipe = build_random_pipeline("random:tiny", dtype=torch.bfloat16)
    before = {
        name: {p.dtype for p in m.parameters()} for name, m in pipe.components.items() if hasattr(m, "parameters")
    }
    img2img = TaskPipelines(RequestScopedPipeline(pipe)).get("StableDiffusion3Img2ImgPipeline").pipeline
    after = {name: {p.dtype for p in m.parameters()} for name, m in pipe.components.items() if hasattr(m, "parameters")}
    assert after == before and before["transformer"] == {torch.bfloat16}
    assert img2img.transformer is pipe.transformer and img2img.vae is pipe.vae
