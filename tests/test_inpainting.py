"""Inpainting as a room of the engine (engine/tasks/inpainting.py), on both runners.

- the threads runner calls diffusers' StableDiffusion3InpaintPipeline over the loaded weights: where the mask
  repaints, its images are that pipeline's, bit for bit, for the same inputs and seed (strength 1.0, the task's
  default, and 0.5); everywhere else they are the init image's own pixels, exactly (the pipeline's decode alters
  them: the task puts them back after it);
- the step runner prepares what that pipeline prepares and blends as it blends after each step: alone, the same
  images bit for bit; batched in the same transformer passes as text-to-image and image-to-image requests, within
  the step engine's tolerance of each image alone;
- where the mask keeps the image, the final latents are the init image's, whatever the seed;
- ``mask_blur`` feathers the mask's edge on both runners: a band at most 3 x mask_blur pixels either side of it
  blends the two, and beyond the band each side is exactly the input or exactly the pipeline's image;
- an inpainting model (a 33-channel transformer: mask and masked image beside the latents) inpaints on both runners
  as the pipeline does, and can run nothing else; a model whose transformer cannot inpaint says why
  (``available_tasks``), and both runners refuse the task with that reason before any work.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline
from PIL import Image

from engine import GenerationRequest
from engine.prompt_cache import PromptCache
from engine.step import StepRunner
from engine.tasks import ImageToImage, Inpainting, available_tasks, get_task
from engine.threads import pipeline_runner
from utils import RequestScopedPipeline

CPU = torch.device("cpu")
SIZE = 32
NOOP = lambda step, latents=None: None  # noqa: E731 - a step callback that does nothing


def _image(seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    """White (repaint) over a block left of the middle, black (keep) elsewhere; edges on the latent grid (8 px)."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 0:16] = 255
    return Image.fromarray(mask)


def _request(task: str = "inpainting", steps: int = 6, seed: int = 11, **extra: Any) -> GenerationRequest:
    if task == "inpainting":
        extra = {"image": _image(), "mask_image": _mask(), **extra}
    return GenerationRequest(
        prompt=extra.pop("prompt", "a red fox in the snow"),
        num_inference_steps=steps,
        num_images=extra.pop("n", 1),
        seed=seed,
        height=SIZE,
        width=SIZE,
        task=task,
        **extra,
    )


def _pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def _repaint(request: GenerationRequest) -> np.ndarray:
    """Where the mask repaints, at the request's size: grey levels of one half and up, as the pipeline binarises."""
    mask = request.mask_image.convert("L").resize((request.width, request.height), Image.Resampling.LANCZOS)
    return np.asarray(mask) >= 128


def _init(request: GenerationRequest) -> np.ndarray:
    """The init image at the request's size (resized as diffusers' image processor does: Lanczos)."""
    return np.asarray(request.image.convert("RGB").resize((request.width, request.height), Image.Resampling.LANCZOS))


def _edited(reference: list[Any], request: GenerationRequest) -> np.ndarray:
    """What an inpainting edit gives (no feather): diffusers' pixels where the mask repaints, the input's elsewhere."""
    return np.where(_repaint(request)[None, :, :, None], _pixels(reference), _init(request)[None])


def _run(pipe: Any, engine_kind: str, request: GenerationRequest) -> list[Any]:
    scoped = RequestScopedPipeline(pipe)
    if engine_kind == "threads":
        return pipeline_runner(scoped, CPU)(request, NOOP)
    runner = StepRunner(scoped, CPU, calibrate=False)  # one loop: calibration only sizes batches
    try:
        return runner(request, NOOP)
    finally:
        runner.close()


def _reference(pipe: Any, request: GenerationRequest) -> list[Any]:
    """diffusers' own inpainting pipeline over the same weights (its own scheduler), for the same inputs and seed."""
    reference = StableDiffusion3InpaintPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    reference.set_progress_bar_config(disable=True)
    return reference(
        prompt=request.prompt,
        image=request.image,
        mask_image=request.mask_image,
        strength=get_task("inpainting").strength(request),
        height=request.height,
        width=request.width,
        num_images_per_prompt=request.num_images,
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images


def _variant(pipe: Any, transformer: dict[str, Any], vae: dict[str, Any] | None = None) -> StableDiffusion3Pipeline:
    """``pipe`` with a freshly seeded random transformer (and VAE) of other channels; the rest shared."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        components = {**pipe.components}
        components["transformer"] = SD3Transformer2DModel.from_config({**pipe.transformer.config, **transformer})
        if vae is not None:
            components["vae"] = AutoencoderKL.from_config({**pipe.vae.config, **vae})
    built = StableDiffusion3Pipeline(**components)
    built.set_progress_bar_config(disable=True)
    return built


@pytest.fixture(scope="module")
def inpainting_model(tiny_pipeline: Any) -> StableDiffusion3Pipeline:
    """An inpainting model: its transformer takes 33 channels (latents, mask, masked image latents), gives 16."""
    return _variant(tiny_pipeline, {"in_channels": 33, "out_channels": 16})


def test_inpainting_is_a_task_whose_default_strength_is_one() -> None:
    task = get_task("inpainting")
    assert isinstance(task, Inpainting) and task.pipeline_class == "StableDiffusion3InpaintPipeline"
    assert task.strength(_request()) == 1.0 and task.steps(_request(steps=10)) == 10
    assert task.steps(_request(steps=10, strength=0.5)) == 5
    assert get_task("image-to-image").strength(_request("image-to-image")) == 0.6  # image-to-image keeps its own
    assert isinstance(get_task("image-to-image"), ImageToImage)


def test_every_task_runs_on_sd3_itself(tiny_pipeline: Any) -> None:
    assert available_tasks(tiny_pipeline) == {"text-to-image": None, "image-to-image": None, "inpainting": None}


@pytest.mark.parametrize("strength", [None, 0.5], ids=["default-1.0", "0.5"])
def test_inpainting_on_the_threads_engine_is_diffusers_own(tiny_pipeline: Any, strength: float | None) -> None:
    request = _request(strength=strength, n=2)
    got = pipeline_runner(RequestScopedPipeline(tiny_pipeline), CPU)(request, NOOP)
    assert np.array_equal(_pixels(got), _edited(_reference(tiny_pipeline, request), request))
    # The mask changed the result: image-to-image of the same image, strength and seed is another image.
    plain = _request("image-to-image", image=_image(), strength=strength or 1.0, n=2)
    unmasked = pipeline_runner(RequestScopedPipeline(tiny_pipeline), CPU)(plain, NOOP)
    assert not np.array_equal(_pixels(got), _pixels(unmasked))


@pytest.mark.parametrize("strength", [1.0, 0.5], ids=["1.0", "0.5"])
def test_inpainting_alone_on_the_step_engine_is_diffusers_own(tiny_pipeline: Any, strength: float) -> None:
    request = _request(strength=strength, n=2, seed=5)
    runner = StepRunner(RequestScopedPipeline(tiny_pipeline), CPU)
    try:
        got = runner(request, NOOP)
    finally:
        runner.close()
    assert np.array_equal(_pixels(got), _edited(_reference(tiny_pipeline, request), request))


@pytest.mark.parametrize("engine_kind", ["threads", "step"])
def test_the_unmasked_pixels_are_the_inputs_exactly(tiny_pipeline: Any, engine_kind: str) -> None:
    """Outside the mask the answer is the input, pixel for pixel, though the pipeline's VAE decode changes every
    pixel; with an input of another size than the output, the input resized to it (as the pipeline resizes it)."""
    big = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    mask = _mask().resize((48, 40), Image.Resampling.NEAREST)
    for request in (_request(steps=2), _request(steps=2, image=big, mask_image=mask)):
        got, kept = _pixels(_run(tiny_pipeline, engine_kind, request)), ~_repaint(request)
        assert kept.sum() > 0 and all(np.array_equal(image[kept], _init(request)[kept]) for image in got)
        decoded = _pixels(_reference(tiny_pipeline, request))
        assert not np.array_equal(decoded[:, kept], got[:, kept])  # the pipeline alone does not keep them
        assert np.array_equal(got[:, ~kept], decoded[:, ~kept])  # the repainted part is the pipeline's


@pytest.mark.parametrize("engine_kind", ["threads", "step"])
def test_mask_blur_feathers_a_band_at_the_masks_edge(tiny_pipeline: Any, engine_kind: str) -> None:
    """mask_blur 2: within 6 pixels of the mask's edge (3 x mask_blur) the input and the pipeline's image are
    blended; beyond, outside the mask, the input exactly; deeper inside, the pipeline's image exactly. The mask
    touches the left border: no band there (the blur extends the border)."""
    request = _request(steps=2, mask_blur=2)
    got = _pixels(_run(tiny_pipeline, engine_kind, request))[0].astype(int)
    init, decoded = _init(request).astype(int), _pixels(_reference(tiny_pipeline, request))[0].astype(int)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    outside = (rows < 8 - 6) | (rows >= 24 + 6) | (cols >= 16 + 6)  # the mask: rows 8..23, columns 0..15
    inside = (rows >= 8 + 6) & (rows < 24 - 6) & (cols < 16 - 6)
    assert np.array_equal(got[outside], init[outside]) and np.array_equal(got[inside], decoded[inside])
    low, high = np.minimum(init, decoded) - 1, np.maximum(init, decoded) + 1
    assert ((got >= low) & (got <= high)).all()  # a blend of the two everywhere
    band = ~outside & ~inside
    blended = (got != init) & (got != decoded)
    assert blended[band].mean() > 0.3, blended[band].mean()  # the band really is a blend


def test_the_kept_region_ends_as_the_init_image_whatever_the_prompt(tiny_pipeline: Any) -> None:
    """The final latents (what the last step callback sees) of two prompts are equal where the mask keeps the image
    (the init image's latents, sampled from the same seed), and differ where it repaints."""
    last: dict[int, torch.Tensor] = {}
    runner = StepRunner(RequestScopedPipeline(tiny_pipeline), CPU)
    try:
        for i, prompt in enumerate(("a red fox", "a lighthouse at dusk")):
            runner(_request(prompt=prompt, steps=4), lambda step, latents=None, i=i: last.__setitem__(i, latents))
    finally:
        runner.close()
    repaint = torch.zeros(last[0].shape[-2:], dtype=torch.bool)
    repaint[1:3, 0:2] = True  # the mask's white block, at the latents' 1/8 size
    assert torch.equal(last[0][..., ~repaint], last[1][..., ~repaint])
    assert not torch.allclose(last[0][..., repaint], last[1][..., repaint])


def test_inpainting_batched_with_other_tasks_on_the_step_engine(tiny_pipeline: Any) -> None:
    """Inpainting, image-to-image and text-to-image requests at once share transformer passes; each image stays
    within the step engine's tolerance of its image alone (the threads engine's, which is diffusers')."""
    scoped = RequestScopedPipeline(tiny_pipeline)
    requests = [
        _request(steps=5, seed=21),
        _request(steps=8, seed=22, strength=0.5, n=2),
        _request("image-to-image", steps=6, seed=23, image=_image(seed=9), strength=0.6),
        _request("text-to-image", steps=7, seed=24),
    ]
    alone = [pipeline_runner(scoped, CPU)(r, NOOP) for r in requests]
    runner = StepRunner(scoped, CPU, max_batch_size=32)
    start = threading.Barrier(len(requests))

    def one(request: GenerationRequest) -> list[Any]:
        start.wait(timeout=30)
        return runner(request, NOOP)

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(one, requests))
        shared = runner.stats["largest_pass"]
    finally:
        runner.close()
    assert shared > 2, "the requests never shared a pass"
    for request, images, reference in zip(requests, together, alone, strict=True):
        diff = np.abs(_pixels(images).astype(int) - _pixels(reference).astype(int))
        assert diff.max() <= 2 and diff.mean() <= 0.01, (request.task, diff.max(), diff.mean())


@pytest.mark.parametrize("engine_kind", ["threads", "step"])
def test_an_inpainting_model_inpaints_as_the_pipeline_does(inpainting_model: Any, engine_kind: str) -> None:
    """33 input channels: diffusers' concat path (mask and masked image latents beside the latents, every pass)."""
    request = _request(strength=0.5, n=2)
    scoped = RequestScopedPipeline(inpainting_model)
    runner: Any = pipeline_runner(scoped, CPU) if engine_kind == "threads" else StepRunner(scoped, CPU)
    try:
        got = runner(request, NOOP)
    finally:
        if engine_kind == "step":
            runner.close()
    assert np.array_equal(_pixels(got), _edited(_reference(inpainting_model, request), request))


def test_an_inpainting_model_runs_nothing_else(inpainting_model: Any) -> None:
    found = available_tasks(inpainting_model)
    assert found["inpainting"] is None
    for task in ("text-to-image", "image-to-image"):
        assert found[task] == (
            f"{task} needs a transformer that takes the VAE's 16-channel latents as they are; "
            "this model's transformer takes 33 input channels"
        )
    runner = StepRunner(RequestScopedPipeline(inpainting_model), CPU)
    try:
        with pytest.raises(ValueError, match="this model's transformer takes 33 input channels"):
            runner(_request("text-to-image"), NOOP)
    finally:
        runner.close()


def test_a_model_that_cannot_inpaint_says_why_and_both_runners_refuse(tiny_pipeline: Any) -> None:
    """A 4-channel latent space (transformer and VAE): text-to-image runs on it, inpainting cannot (the pipeline
    blends 16-channel latents only), and the runners refuse it with the reason before encoding anything."""
    model = _variant(tiny_pipeline, {"in_channels": 4, "out_channels": 4}, {"latent_channels": 4})
    reason = available_tasks(model)["inpainting"]
    assert reason == (
        "inpainting needs a transformer of 16 input channels (SD3's own) or 33 (an inpainting model) over a "
        "16-channel VAE; this model's transformer takes 4 over a 4-channel VAE"
    )
    assert available_tasks(model)["text-to-image"] is None
    scoped = RequestScopedPipeline(model)
    cache = PromptCache(8)
    runners: list[Any] = [pipeline_runner(scoped, CPU, prompt_cache=cache), StepRunner(scoped, CPU, prompt_cache=cache)]
    try:
        steps: list[int] = []
        for runner in runners:
            with pytest.raises(ValueError) as refused:
                runner(_request(), lambda step, latents=None: steps.append(step))
            assert str(refused.value) == reason and steps == []
            assert cache.stats()["misses"] == 0  # refused before its prompt was encoded
        assert runners[1].stats["passes"] == 0
        assert len(runners[1](_request("text-to-image", steps=2), NOOP)) == 1  # the model itself works
    finally:
        runners[1].close()
