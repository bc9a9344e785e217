"""The step engine's loop against the threads engine's images: batching, joining, mixed sizes, cancel, OOM.

References are the threads engine's images (``pipeline_runner``: one pipeline call per request) for the same
request alone. Measured on this CPU (fp32): a request alone gives bit-identical images; in a shared batch a few
pixels differ by 1 (of 255), mean absolute difference below 0.001. The bounds below leave room for other CPUs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from engine import Engine, GenerationCancelled, GenerationRequest, OutOfMemory
from engine.costs import CostModel
from engine.prompt_cache import PromptCache
from engine.step import StepRunner
from engine.threads import pipeline_runner
from utils import RequestScopedPipeline

MAX_ABS, MEAN_ABS = 2, 0.01  # pixel levels (0..255): tolerance for a request batched with others


def _req(i: int, steps: int = 3, n: int = 1, size: int = 32, guidance: float | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"a fox number {i}",
        negative_prompt="blurry" if i % 3 == 0 else None,
        num_inference_steps=steps,
        num_images=n,
        seed=500 + i,
        height=size,
        width=size,
        guidance_scale=guidance,
        request_id=f"r{i}",
    )


def _noop(step: int, latents: Any = None) -> None:
    pass


def _arrays(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def _assert_close(got: list[Any], want: list[Any], label: str) -> None:
    assert len(got) == len(want), label
    diff = np.abs(_arrays(got) - _arrays(want))
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, f"{label}: max {diff.max()}, mean {diff.mean():.5f}"


@pytest.fixture(scope="module")
def scoped(tiny_pipeline: Any) -> RequestScopedPipeline:
    return RequestScopedPipeline(tiny_pipeline)


@pytest.fixture(scope="module")
def alone(scoped: RequestScopedPipeline) -> Callable[[GenerationRequest], list[Any]]:
    """The threads engine's images for a request alone (memoised)."""
    run = pipeline_runner(scoped, torch.device("cpu"))
    memo: dict[str, list[Any]] = {}

    def images(request: GenerationRequest) -> list[Any]:
        key = repr(request)
        if key not in memo:
            memo[key] = run(request, _noop)
        return memo[key]

    return images


@pytest.fixture
def step(scoped: RequestScopedPipeline) -> Any:
    # Batching up to 32 whatever the passes cost (a cost model that learns nothing): these tests are about the
    # images of requests sharing passes, so they must share them; tests/test_step_costs.py tests the batch sizes.
    runner = StepRunner(
        scoped,
        torch.device("cpu"),
        max_batch_size=32,
        prompt_cache=PromptCache(32),
        costs=CostModel(32, learn=False),
        calibrate=False,
    )
    yield runner
    runner.close()


def _together(runner: StepRunner, requests: list[GenerationRequest], hooks: dict[int, Any] | None = None) -> list[Any]:
    """Run ``requests`` at once (a barrier), each from its own thread as the Engine's slots would."""
    start = threading.Barrier(len(requests))
    hooks = hooks or {}

    def one(i: int) -> Any:
        start.wait(timeout=30)
        try:
            return runner(requests[i], hooks.get(i, _noop))
        except GenerationCancelled as exc:
            return exc

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, range(len(requests))))


def test_a_request_alone_is_bit_identical_to_the_threads_engine(step: StepRunner, alone: Callable) -> None:
    for request in (_req(0), _req(1, n=2, guidance=1.0), _req(2, guidance=4.0)):
        got = step(request, _noop)
        assert [im.tobytes() for im in got] == [im.tobytes() for im in alone(request)], request


def test_eight_different_requests_batched_match_their_images_alone(step: StepRunner, alone: Callable) -> None:
    guidance = [None, 1.0, 4.5, 0.5, 7.0, None, 1.0, 3.0, 2.0, 0.0]
    requests = [_req(i, steps=2 + i % 3, n=1 + i % 3, guidance=guidance[i]) for i in range(10)]
    together = _together(step, requests)
    for request, images in zip(requests, together, strict=True):
        _assert_close(images, alone(request), request.request_id)
    stats = step.stats
    assert stats["largest_pass"] > 6, f"the requests never shared a pass: {stats}"
    assert stats["largest_pass"] <= 32


def test_a_request_joining_at_step_5_and_the_running_one_are_both_right(step: StepRunner, alone: Callable) -> None:
    first, second = _req(20, steps=12), _req(21, steps=4, n=2, guidance=1.0)
    joined: dict[str, Any] = {}
    steps_of_first: list[int] = []

    def join() -> None:
        joined["images"] = step(second, lambda s, latents: joined.setdefault("first_step_while", len(steps_of_first)))

    joiner = threading.Thread(target=join)

    def on_step(index: int, latents: Any = None) -> None:
        steps_of_first.append(index)
        if index == 4:  # five steps done: the second request arrives now
            joiner.start()
            # Called from the loop thread: hold it until the second request has arrived (it encodes first), so that
            # it joins at the next pass however slow this machine is.
            deadline = time.monotonic() + 60
            while step.loop.arriving == 0 and joiner.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)

    images = step(first, on_step)
    joiner.join(timeout=60)
    _assert_close(images, alone(first), "running")
    _assert_close(joined["images"], alone(second), "joined")
    assert 5 <= joined["first_step_while"] < 12, "the joined request did not step while the first was running"
    assert step.stats["largest_pass"] == 2 + 2, "the two never shared a pass"


def test_mixed_resolutions_at_once_and_a_lone_small_request_is_not_starved(
    step: StepRunner, alone: Callable, scoped: RequestScopedPipeline
) -> None:
    big = [_req(30 + i, steps=16, size=48) for i in range(3)]
    small = _req(40, steps=4, size=32, guidance=1.0)
    order: list[str] = []
    lock = threading.Lock()  # protects `order`: written from the loop thread, read here

    def record(name: str) -> Callable[..., None]:
        def on_step(index: int, latents: Any = None) -> None:
            with lock:
                order.append(name)

        return on_step

    hooks = {i: record(r.request_id) for i, r in enumerate(big)}
    small_done: dict[str, Any] = {}

    def late_small(index: int, latents: Any = None) -> None:
        record("r30")(index)
        if index == 2 and "thread" not in small_done:  # the big ones are running: the small one arrives
            small_done["thread"] = threading.Thread(target=lambda: small_done.update(images=step(small, record("s"))))
            small_done["thread"].start()

    hooks[0] = late_small
    together = _together(step, big, hooks)
    small_done["thread"].join(timeout=60)
    for request, images in zip(big, together, strict=True):
        _assert_close(images, alone(request), request.request_id)
    _assert_close(small_done["images"], alone(small), "small")
    # Round robin between the two sizes: the small request's 4 steps are done while the big ones are mid-way.
    last_small = max(i for i, name in enumerate(order) if name == "s")
    big_steps_before = sum(1 for name in order[:last_small] if name == "r30")
    assert big_steps_before < 16 - 4, f"the small request waited for the big ones: {big_steps_before} big steps first"


def test_cancelling_one_of_four_stops_it_at_the_next_step_and_the_others_are_unaffected(
    step: StepRunner, alone: Callable
) -> None:
    requests = [_req(50 + i, steps=6, n=1 + i % 2) for i in range(4)]
    seen: list[int] = []

    def cancel_at_2(index: int, latents: Any = None) -> None:
        seen.append(index)
        if index >= 2:
            raise GenerationCancelled

    together = _together(step, requests, {1: cancel_at_2})
    assert isinstance(together[1], GenerationCancelled)
    assert seen == [0, 1, 2], "the cancelled request went on stepping"
    for i in (0, 2, 3):
        _assert_close(together[i], alone(requests[i]), requests[i].request_id)
    assert step.stats["largest_pass"] >= 8, "the four never shared a pass"


class _SmallDevice:
    """The tiny transformer on a 'device' with room for at most ``room`` samples per pass."""

    def __init__(self, transformer: Any, room: int) -> None:
        self.transformer = transformer
        self.room = room
        self.sizes: list[int] = []

    def __call__(self, **kwargs: Any) -> Any:
        size = kwargs["hidden_states"].shape[0]
        self.sizes.append(size)
        if size > self.room:
            raise MemoryError("not enough memory")
        return self.transformer(**kwargs)


def test_out_of_memory_retries_as_smaller_passes_then_answers_503_and_goes_on(
    step: StepRunner, alone: Callable
) -> None:
    device = _SmallDevice(step.loop.transformer, room=2)
    step.loop.transformer = device  # the loop's reference only: the shared pipeline is not touched
    requests = [_req(60 + i, steps=3) for i in range(4)]  # 2 samples each (guided)
    together = _together(step, requests)
    for request, images in zip(requests, together, strict=True):
        _assert_close(images, alone(request), request.request_id)
    assert max(device.sizes) > 2 and device.sizes.count(2) >= 3 * 4

    engine = Engine(step, max_concurrency=2, release=lambda: None, kind="step")
    engine.set_ready()

    async def both() -> list[Any]:
        too_big = _req(70, steps=2, n=2)  # 4 samples: fails even alone
        return await asyncio.gather(engine.submit(too_big), engine.submit(_req(71, steps=2)), return_exceptions=True)

    failed, served = asyncio.run(both())
    assert isinstance(failed, OutOfMemory)
    _assert_close(served.images, alone(_req(71, steps=2)), "served beside the failure")
    assert engine.stats["out_of_memory"] == 1 and engine.stats["completed"] == 1
    engine.close()


def test_closing_the_loop_ends_the_requests_in_it(scoped: RequestScopedPipeline) -> None:
    runner = StepRunner(scoped, torch.device("cpu"))
    stepping = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(runner, _req(80, steps=10_000), lambda index, latents: stepping.set())
        assert stepping.wait(60)
        runner.close()
        with pytest.raises(GenerationCancelled):
            running.result(timeout=60)
    with pytest.raises(GenerationCancelled):
        runner(_req(81), _noop)  # a closed loop takes no more work


def test_compile_compiles_each_repeated_block_of_a_private_copy(tiny_pipeline: Any) -> None:
    import copy
    from types import SimpleNamespace

    from api.loading import compile_blocks

    transformer = copy.deepcopy(tiny_pipeline.transformer)  # the session pipeline is never touched
    compile_blocks(transformer)  # lazy: compiling happens at the first call (measured: ~60 s here, so not run)
    assert all(block._compiled_call_impl is not None for block in transformer.transformer_blocks)
    assert tiny_pipeline.transformer.transformer_blocks[0]._compiled_call_impl is None
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_blocks(SimpleNamespace(transformer_blocks=[]))


def test_prompts_arriving_together_are_encoded_in_one_batch(step: StepRunner, alone: Callable) -> None:
    view = step._encoder._pipe  # the encoder thread's own view (not the shared pipeline)
    encode_prompt = view.encode_prompt
    sizes: list[int] = []

    def slow_first(*args: Any, **kwargs: Any) -> Any:
        sizes.append(len(kwargs["prompt"]))
        if len(sizes) == 1:
            time.sleep(1.0)  # the other requests arrive meanwhile and queue up behind this call
        return encode_prompt(*args, **kwargs)

    object.__setattr__(view, "encode_prompt", slow_first)
    requests = [_req(90 + i, steps=2, guidance=1.0) for i in range(6)]  # no negative prompt to encode
    together = _together(step, requests)
    assert sum(sizes) == 6 and max(sizes) >= 2, f"each prompt was encoded alone: {sizes}"
    for request, images in zip(requests, together, strict=True):
        _assert_close(images, alone(request), request.request_id)
