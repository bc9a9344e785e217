"""RequestScopedPipeline under real threads: the race is real, and the view fixes it without copying weights."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from utils import BaseAsyncScheduler, RequestScopedPipeline, ThreadSafeTokenizerWrapper

SIZE = 64


def _request(i: int) -> dict[str, Any]:
    """Request i of a mixed load: different step counts, seeds and prompts."""
    return {
        "prompt": f"a photo of object number {i}",
        "num_inference_steps": 2 + i % 6,
        "seed": 1000 + i,
    }


def _call(fn: Callable[..., Any], req: dict[str, Any], **extra: Any) -> np.ndarray:
    out = fn(
        req["prompt"],
        num_inference_steps=req["num_inference_steps"],
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(req["seed"]),
        output_type="np",
        **extra,
    )
    return out.images


def _run_threads(work: Callable[[int], Any], n: int) -> tuple[dict[int, Any], dict[int, BaseException]]:
    """Run work(i) for i in range(n) on n real threads released together; collect results and errors."""
    barrier = threading.Barrier(n)
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - the test inspects every failure
            errors[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, errors


@pytest.fixture(scope="module")
def references(tiny_pipeline) -> dict[int, np.ndarray]:
    """Each request of the load run alone, one after another."""
    scoped = RequestScopedPipeline(tiny_pipeline)
    return {i: _call(scoped.generate, _request(i)) for i in range(16)}


def test_bare_shared_pipeline_races(tiny_pipeline, references) -> None:
    """Without the view, concurrent calls on one pipeline fail or give wrong images (so the fix is needed)."""
    broken = 0
    for _ in range(3):  # a race is probabilistic: a few rounds make it certain in practice
        results, errors = _run_threads(lambda i: _call(tiny_pipeline, _request(i)), 12)
        wrong = [i for i, img in results.items() if not np.array_equal(img, references[i])]
        broken += len(errors) + len(wrong)
        if broken:
            break
    assert broken > 0, "12 threads on one bare pipeline should collide on its scheduler or tokenizers"


def test_concurrent_requests_match_solo_runs(tiny_pipeline, references) -> None:
    scoped = RequestScopedPipeline(tiny_pipeline)
    shared_timesteps = tiny_pipeline.scheduler.timesteps.clone()
    shared_state = dict(vars(tiny_pipeline))

    results, errors = _run_threads(lambda i: _call(scoped.generate, _request(i)), 16)

    assert errors == {}
    assert sorted(results) == list(range(16))
    for i, image in results.items():
        assert np.array_equal(image, references[i]), f"request {i} differs from its solo run"
    # The shared pipeline was not written to: same attributes, same objects, same schedule.
    assert torch.equal(tiny_pipeline.scheduler.timesteps, shared_timesteps)
    assert dict(vars(tiny_pipeline)).keys() == shared_state.keys()
    for name, value in vars(tiny_pipeline).items():
        assert value is shared_state[name], f"shared attribute {name} was replaced"
    assert not isinstance(tiny_pipeline.scheduler, BaseAsyncScheduler)


def test_view_shares_weights_and_isolates_state(tiny_pipeline) -> None:
    scoped = RequestScopedPipeline(tiny_pipeline)
    view = scoped.make_view(num_inference_steps=5)

    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        base_module, view_module = getattr(tiny_pipeline, name), getattr(view, name)
        base_ptrs = [p.data_ptr() for p in base_module.parameters()]
        view_ptrs = [p.data_ptr() for p in view_module.parameters()]
        assert base_ptrs and base_ptrs == view_ptrs, f"{name} weights are not shared"

    assert isinstance(view.scheduler, BaseAsyncScheduler)
    assert view.scheduler.scheduler is not tiny_pipeline.scheduler
    assert len(view.scheduler.timesteps) == 5
    # The view keeps the base's config: replacing components on it did not re-register anything.
    assert view.config is tiny_pipeline.config


def test_tokenizers_are_detected_and_wrapped_on_the_view_only(tiny_pipeline) -> None:
    scoped = RequestScopedPipeline(tiny_pipeline)
    assert set(scoped.tokenizer_names) == {"tokenizer", "tokenizer_2", "tokenizer_3"}
    view = scoped.make_view(2)
    for name in scoped.tokenizer_names:
        assert isinstance(getattr(view, name), ThreadSafeTokenizerWrapper)
        assert getattr(view, name).lock is scoped.tokenizer_lock
        assert not isinstance(getattr(tiny_pipeline, name), ThreadSafeTokenizerWrapper)


def _spy_on_tokenizers(pipeline: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count tokenizer calls in flight at once, across all three tokenizers."""
    stats = {"inside": 0, "max_inside": 0, "calls": 0}
    count_lock = threading.Lock()  # protects stats only

    # The two CLIP tokenizers share a class: patch each class once, or calls would count twice.
    for cls in {type(getattr(pipeline, n)) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")}:
        original = cls.__call__

        def spied(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with count_lock:
                stats["inside"] += 1
                stats["calls"] += 1
                stats["max_inside"] = max(stats["max_inside"], stats["inside"])
            try:
                time.sleep(0.003)  # widen the window: unserialised calls will overlap
                return _original(self, *args, **kwargs)
            finally:
                with count_lock:
                    stats["inside"] -= 1

        monkeypatch.setattr(cls, "__call__", spied)
    return stats


def test_tokenizer_lock_serialises_calls(tiny_pipeline, monkeypatch) -> None:
    stats = _spy_on_tokenizers(tiny_pipeline, monkeypatch)
    scoped = RequestScopedPipeline(tiny_pipeline)
    _, errors = _run_threads(lambda i: _call(scoped.generate, {**_request(i), "num_inference_steps": 1}), 12)
    assert errors == {}
    assert stats["calls"] >= 12 * 3
    assert stats["max_inside"] == 1


def test_tokenizer_spy_sees_overlap_without_the_lock(tiny_pipeline, monkeypatch) -> None:
    # The same load with a lock that locks nothing: the spy must see overlapping calls, which shows that the
    # check above can fail.
    stats = _spy_on_tokenizers(tiny_pipeline, monkeypatch)
    scoped = RequestScopedPipeline(tiny_pipeline, tokenizer_lock=contextlib.nullcontext())
    _run_threads(lambda i: _call(scoped.generate, {**_request(i), "num_inference_steps": 1}), 12)
    assert stats["max_inside"] > 1


def test_mutable_attributes_are_cloned_and_read_only_properties_skipped(tiny_pipeline) -> None:
    big = torch.zeros(2_000_000)
    small = torch.zeros(10)
    tiny_pipeline.__dict__.update(_test_list=[1], _test_small=small, _test_big=big)
    try:
        scoped = RequestScopedPipeline(tiny_pipeline, mutable_attrs=["components", "_test_big"])
        view = scoped.make_view(2)
        assert view._test_list == [1] and view._test_list is not tiny_pipeline._test_list
        assert view._test_small is not small and torch.equal(view._test_small, small)
        assert view._test_big is big  # above the threshold: shared, never duplicated
        assert view.components.keys() == tiny_pipeline.components.keys()  # read-only property skipped

        view._test_list.append(2)
        assert tiny_pipeline._test_list == [1]
        frozen = RequestScopedPipeline(tiny_pipeline, auto_detect_mutables=False).make_view(2)
        assert frozen._test_list is tiny_pipeline._test_list
    finally:
        for name in ("_test_list", "_test_small", "_test_big"):
            tiny_pipeline.__dict__.pop(name)


def test_offload_context_is_entered_when_offered(tiny_pipeline) -> None:
    entered: list[str] = []

    @contextlib.contextmanager
    def model_cpu_offload_context():
        entered.append("in")
        yield
        entered.append("out")

    tiny_pipeline.__dict__["model_cpu_offload_context"] = model_cpu_offload_context
    try:
        RequestScopedPipeline(tiny_pipeline).generate("x", num_inference_steps=1, height=SIZE, width=SIZE)
    finally:
        del tiny_pipeline.__dict__["model_cpu_offload_context"]
    assert entered == ["in", "out"]


def _memory_bench() -> Any:
    """bench/memory.py, which builds the big pipeline and measures the growth (one implementation for both)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_memory_grows_far_less_than_one_model_copy(tiny_pipeline) -> None:
    memory = _memory_bench()
    # A ~900 MB transformer on the tiny pipeline's other parts: one copy would show in RSS.
    pipe, weights = memory.build(24, tiny_pipeline)
    assert weights > 800e6
    scoped = RequestScopedPipeline(pipe)
    memory.peak_growth(scoped, 1)  # warm-up: first-call allocations are not per-request growth
    growth, errors = memory.peak_growth(scoped, 16)
    assert errors == {}
    assert growth < 0.25 * weights, f"RSS grew {growth / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
