"""The task seam (engine/tasks): both runners ask the request's task, and only it, what differs between tasks.

- text-to-image's start is exactly the pipeline's own preparation (latents and timesteps, with and without the
  resolution-dependent shift);
- the threads runner calls the pipeline class a task names, with the task's arguments, built over the loaded
  pipeline's weights (image-to-image: its images equal diffusers' own img2img pipeline's, bit for bit), and the step
  runner gives the same alone, and within its tolerance when batched with text-to-image;
- the step runner starts from the task's ``Start`` and applies its ``after_step`` after every scheduler step,
  before the request's step callback.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from PIL import Image

from engine import Engine, GenerationRequest, ProgressEvent
from engine.step import StepRunner
from engine.tasks import DEFAULT_TASK, TASKS, ImageToImage, Start, Task, TaskPipelines, TextToImage, get_task
from engine.threads import pipeline_runner
from utils import RequestScopedPipeline

CPU = torch.device("cpu")


def _request(
    task: str = DEFAULT_TASK, steps: int = 4, seed: int = 11, size: int = 32, **extra: Any
) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red fox in the snow",
        num_inference_steps=steps,
        num_images=extra.pop("n", 1),
        seed=seed,
        height=size,
        width=size,
        task=task,
        **extra,
    )


def _init_image(size: int = 32, seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


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
    assert isinstance(get_task("image-to-image"), ImageToImage)
    with pytest.raises(ValueError, match="unknown task 'sketch-to-image'; known tasks: text-to-image, image-to-image"):
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


NOOP = lambda step, latents=None: None  # noqa: E731 - a step callback that does nothing


def _img2img_reference(pipe: Any, request: GenerationRequest) -> list[Any]:
    """diffusers' own image-to-image pipeline over the same weights, for the same inputs and seed."""
    # Its own scheduler: a pipeline call sets its scheduler's timesteps and begin index, and the session's pipeline
    # must not be written to.
    reference = StableDiffusion3Img2ImgPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    reference.set_progress_bar_config(disable=True)
    kwargs = {} if request.strength is None else {"strength": request.strength}
    return reference(
        prompt=request.prompt,
        image=request.image,
        height=request.height,
        width=request.width,
        num_images_per_prompt=request.num_images,
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **kwargs,
    ).images


@pytest.mark.parametrize("strength", [None, 0.35, 1.0], ids=["default", "0.35", "1.0"])
def test_image_to_image_on_the_threads_engine_is_diffusers_own(tiny_pipeline: Any, strength: float | None) -> None:
    """The threads runner calls the pipeline class the task names, with its arguments: bit-identical to diffusers'
    StableDiffusion3Img2ImgPipeline for the same inputs and seed (its default strength, 0.6, when none is given)."""
    request = _request("image-to-image", steps=6, image=_init_image(), strength=strength, n=2)
    got = pipeline_runner(RequestScopedPipeline(tiny_pipeline), CPU)(request, NOOP)
    assert np.array_equal(_pixels(got), _pixels(_img2img_reference(tiny_pipeline, request)))
    # Not a text-to-image image in disguise: the init image changed the result.
    text = pipeline_runner(RequestScopedPipeline(tiny_pipeline), CPU)(_request(steps=6, n=2), NOOP)
    assert not np.array_equal(_pixels(got), _pixels(text))


def test_image_to_image_on_the_step_engine_alone_and_batched_with_text_to_image(tiny_pipeline: Any) -> None:
    """Alone, the step engine gives the threads engine's image-to-image images bit for bit; batched in the same
    transformer passes as text-to-image requests (other timesteps, other schedules), each stays within the step
    engine's tolerance of its image alone."""
    scoped = RequestScopedPipeline(tiny_pipeline)
    edits = [
        _request("image-to-image", steps=s, seed=20 + s, image=_init_image(seed=s), strength=st)
        for s, st in ((5, 0.6), (8, 0.5), (6, 1.0))
    ]
    texts = [_request(steps=s, seed=40 + s) for s in (4, 7)]
    alone = {id(r): pipeline_runner(scoped, CPU)(r, NOOP) for r in edits + texts}
    runner = StepRunner(scoped, CPU, max_batch_size=32)
    try:
        first = runner(edits[0], NOOP)
        assert np.array_equal(_pixels(first), _pixels(alone[id(edits[0])]))
        start = threading.Barrier(len(edits) + len(texts))

        def one(request: GenerationRequest) -> list[Any]:
            start.wait(timeout=30)
            return runner(request, NOOP)

        with ThreadPoolExecutor(len(edits) + len(texts)) as pool:
            together = list(pool.map(one, edits + texts))
        shared = runner.stats["largest_pass"]
    finally:
        runner.close()
    assert shared > 2, "the requests never shared a pass"
    for request, images in zip(edits + texts, together, strict=True):
        diff = np.abs(_pixels(images).astype(int) - _pixels(alone[id(request)]).astype(int))
        assert diff.max() <= 2 and diff.mean() <= 0.01, (request.task, diff.max(), diff.mean())


def test_image_to_image_refuses_what_it_cannot_run(tiny_pipeline: Any) -> None:
    view = TaskPipelines(RequestScopedPipeline(tiny_pipeline)).get("StableDiffusion3Img2ImgPipeline").make_view()
    task = get_task("image-to-image")
    with pytest.raises(ValueError, match="needs an init image"):
        task.start(view, _request("image-to-image"), torch.float32, CPU)
    with pytest.raises(ValueError, match="leaves no step of 4"):
        task.start(view, _request("image-to-image", image=_init_image(), strength=0.0), torch.float32, CPU)


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


@pytest.mark.parametrize("engine_kind", ["threads", "step"])
def test_progress_counts_the_steps_an_image_to_image_request_really_runs(tiny_pipeline: Any, engine_kind: str) -> None:
    """strength 0.5 of 10 steps runs 5: the step events count 1..5 of 5, on either engine, as the pipeline runs."""
    scoped = RequestScopedPipeline(tiny_pipeline)
    runner: Any = pipeline_runner(scoped, CPU) if engine_kind == "threads" else StepRunner(scoped, CPU)
    engine = Engine(runner, release=lambda: None, kind=engine_kind)
    engine.set_ready()
    request = _request("image-to-image", steps=10, image=_init_image(), strength=0.5)
    events: list[ProgressEvent] = []

    async def main() -> None:
        await engine.submit(request, progress=events.append)
        await asyncio.sleep(0.05)  # the last events are handed to the loop from the worker thread

    try:
        asyncio.run(main())
    finally:
        engine.close()
    assert get_task("image-to-image").steps(request) == 5
    steps = [(e.step, e.total) for e in events if e.type == "step"]
    assert steps == [(i, 5) for i in range(1, 6)], steps
