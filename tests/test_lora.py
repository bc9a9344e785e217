"""Per-request LoRA adapters (engine/adapters.py): the pool, its gate, and the runners' contract with diffusers.

Every test builds its own pipeline (adapters change a pipeline's modules; the session's shared tiny pipeline never
gets one). Adapters are random-weight ones made with peft here, in diffusers' format.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_helpers import fresh_tiny, make_adapter, reference_images

from engine import GenerationRequest
from engine.adapter_loading import quiet_load
from engine.adapters import (
    AdapterGate,
    AdapterPool,
    AdapterPoolFull,
    AdapterUnloadable,
    TooManyAdapters,
    UnknownAdapter,
    read_adapter,
)
from engine.threads import pipeline_runner
from utils import RequestScopedPipeline

CPU = torch.device("cpu")
SIZE = 32
STEPS = 3


def NOOP(step: int, latents: Any) -> None:  # noqa: N802 - a constant-like callback
    return None


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "ink": make_adapter(root / "ink", seed=1),
        "neon": make_adapter(root / "neon", seed=2, rank=2, scale=1.5),
        "clay": make_adapter(root / "clay", seed=3),
    }


def _request(loras: tuple[tuple[str, float], ...] = (), seed: int = 5, prompt: str = "a red fox") -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, num_inference_steps=STEPS, num_images=1, seed=seed, height=SIZE, width=SIZE, loras=loras
    )


def _pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def _reference(files: dict[str, Path], request: GenerationRequest) -> np.ndarray:
    images = reference_images(
        files,
        request.loras,
        prompt=request.prompt,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        seed=request.seed,
    )
    return _pixels(images)


def test_adapters_change_the_image_and_scales_matter(adapter_files) -> None:
    base = _reference(adapter_files, _request())
    ink = _reference(adapter_files, _request((("ink", 1.0),)))
    half = _reference(adapter_files, _request((("ink", 0.5),)))
    assert (base != ink).any() and (ink != half).any() and (base != half).any()


def test_one_request_equals_diffusers_with_its_adapters(adapter_files) -> None:
    pipe = fresh_tiny()
    pool = AdapterPool(pipe, {"ink": adapter_files["ink"], "neon": adapter_files["neon"]}, capacity=4)
    run = pipeline_runner(RequestScopedPipeline(pipe), CPU, adapters=pool)
    for loras in [(("ink", 1.0),), (("neon", 0.7), ("ink", 0.4)), ()]:
        request = _request(loras)
        np.testing.assert_array_equal(_pixels(run(request, NOOP)), _reference(adapter_files, request), str(loras))


def test_concurrent_requests_with_different_adapters_never_see_each_others(adapter_files) -> None:
    """Six slot threads at once, four adapter sets (one of them none): each image is diffusers' own for its set.
    Without the gate the sets switch each other's modules between steps and the images come out wrong."""
    pipe = fresh_tiny()
    pool = AdapterPool(pipe, {"ink": adapter_files["ink"], "neon": adapter_files["neon"]}, capacity=4)
    run = pipeline_runner(RequestScopedPipeline(pipe), CPU, adapters=pool)
    sets = [(), (("ink", 1.0),), (("neon", 1.0),), (("ink", 0.5), ("neon", 0.5))]
    requests = [_request(sets[i % 4], seed=i, prompt=f"a fox {i}") for i in range(8)]
    start = threading.Barrier(6)

    def one(request: GenerationRequest) -> np.ndarray:
        start.wait()
        return _pixels(run(request, NOOP))

    with ThreadPoolExecutor(6) as executor:
        got = list(executor.map(one, requests[:6])) + [_pixels(run(r, NOOP)) for r in requests[6:]]
    for request, image in zip(requests, got, strict=True):
        np.testing.assert_array_equal(image, _reference(adapter_files, request), f"{request.loras} seed {request.seed}")
    assert pool.gate.switches >= 4  # the sets really did take turns


def test_a_request_without_adapters_is_the_base_model_bit_for_bit(adapter_files, tiny_pipeline) -> None:
    pipe = fresh_tiny()
    pool = AdapterPool(pipe, {"ink": adapter_files["ink"]}, capacity=2)
    run = pipeline_runner(RequestScopedPipeline(pipe), CPU, adapters=pool)
    run(_request((("ink", 1.0),)), NOOP)  # the modules were last set to an adapter
    plain = pipeline_runner(RequestScopedPipeline(tiny_pipeline), CPU)
    np.testing.assert_array_equal(_pixels(run(_request(), NOOP)), _pixels(plain(_request(), NOOP)))


def test_the_directory_pool_loads_on_first_use_and_evicts_the_least_recently_used(adapter_files, tmp_path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    for name in ("ink", "neon", "clay"):
        (directory / f"{name}.safetensors").write_bytes(adapter_files[name].read_bytes())
    pipe = fresh_tiny()
    pool = AdapterPool(pipe, {}, directory=directory, capacity=2)
    assert pool.names() == ["clay", "ink", "neon"] and pool.stats()["loaded"] == []
    run = pipeline_runner(RequestScopedPipeline(pipe), CPU, adapters=pool)

    def generate(loras: tuple[tuple[str, float], ...]) -> np.ndarray:
        pool.acquire(loras).result()
        try:
            return _pixels(run(_request(loras), NOOP))
        finally:
            pool.release(loras)

    generate((("ink", 1.0),))
    generate((("neon", 1.0),))
    generate((("ink", 1.0),))  # a hit: ink is now the most recently used
    clay = generate((("clay", 1.0),))  # evicts neon
    assert pool.stats()["loaded"] == ["ink", "clay"]
    assert (pool.hits, pool.misses) == (1, 3)
    np.testing.assert_array_equal(clay, _reference(adapter_files, _request((("clay", 1.0),))))
    neon = generate((("neon", 1.0),))  # back in (evicts ink), and still right
    np.testing.assert_array_equal(neon, _reference(adapter_files, _request((("neon", 1.0),))))


def test_an_adapter_in_use_is_never_evicted(adapter_files, tmp_path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir()
    for name in ("ink", "neon"):
        (directory / f"{name}.safetensors").write_bytes(adapter_files[name].read_bytes())
    pool = AdapterPool(fresh_tiny(), {}, directory=directory, capacity=1)
    pool.acquire((("ink", 1.0),)).result()
    with pytest.raises(AdapterPoolFull, match="in use"):
        pool.acquire((("neon", 1.0),)).result()
    pool.release((("ink", 1.0),))
    pool.acquire((("neon", 1.0),)).result()
    assert pool.stats()["loaded"] == ["neon"]


def test_a_set_of_more_directory_adapters_than_the_pool_can_hold_is_refused_before_any_load(
    adapter_files, tmp_path
) -> None:
    """Each adapter of a set is held while its request runs: a set of more directory adapters than the pool has room
    for (capacity less the start-up ones) could never load; it is refused at once, not as a full pool."""
    for name in ("neon", "clay"):
        (tmp_path / f"{name}.safetensors").write_bytes(adapter_files[name].read_bytes())
    pool = AdapterPool(fresh_tiny(), {"ink": adapter_files["ink"]}, directory=tmp_path, capacity=2)
    assert pool.room == 1
    with pytest.raises(TooManyAdapters, match=r"'neon', 'clay'.*at most 1 of them at once \(--max-loras 2, less the 1"):
        pool.acquire((("ink", 1.0), ("neon", 1.0), ("clay", 0.5)))
    assert pool.stats()["loaded"] == ["ink"] and pool.misses == 0
    pool.acquire((("ink", 1.0), ("clay", 1.0))).result()  # the start-up one and one more fit


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_loading_adapters_logs_none_of_the_warnings_it_expects_and_every_other_one(adapter_files, tmp_path) -> None:
    """diffusers' "No LoRA keys associated to CLIPTextModelWithProjection ... open an issue" and PEFT's "Already found
    a `peft_config` ... Make sure to know what you are doing!" come with every load of a further adapter, as does
    diffusers' "missing keys" for a name found inside other keys (``b`` in ``transformer_blocks``): none is logged.
    The same messages outside a load, and other warnings during one, still are."""
    (tmp_path / "b.safetensors").write_bytes(adapter_files["clay"].read_bytes())
    records = _Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            files = {"ink": adapter_files["ink"], "neon": adapter_files["neon"]}
            pool = AdapterPool(fresh_tiny(), files, directory=tmp_path, capacity=3)
            pool.acquire((("b", 1.0),)).result()  # on the loader thread
        assert pool.stats()["loaded"] == ["ink", "neon", "b"]
        assert records.messages == [], records.messages
        assert [str(w.message) for w in caught] == []

        lora_base = logging.getLogger("diffusers.loaders.lora_base")
        peft_utils = logging.getLogger("diffusers.utils.peft_utils")
        text_encoder = "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder'."
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lora_base.warning(text_encoder)  # not loading: shown
            warnings.warn("Already found a `peft_config` attribute in the model.", UserWarning, stacklevel=1)
            with quiet_load("ink"):
                lora_base.warning(
                    "No LoRA keys associated to SD3Transformer2DModel found with the prefix='transformer'"
                )
                peft_utils.warning(
                    "Loading adapter weights from state_dict led to missing keys in the model: "
                    "transformer_blocks.0.attn.to_q.lora_A.ink.weight."
                )
                warnings.warn("another library's warning", UserWarning, stacklevel=1)
                lora_base.warning(text_encoder)  # loading: left out
                warnings.warn("Already found a `peft_config` attribute in the model.", UserWarning, stacklevel=1)
        assert len(records.messages) == 3 and records.messages[0] == text_encoder, records.messages
        assert "prefix='transformer'" in records.messages[1] and "lora_A.ink" in records.messages[2]
        assert [str(w.message) for w in caught] == [
            "Already found a `peft_config` attribute in the model.",
            "another library's warning",
        ]
    finally:
        logging.getLogger("diffusers").removeHandler(records)


def test_unknown_and_unreadable_adapters_say_which_and_why(adapter_files, tmp_path) -> None:
    pool = AdapterPool(fresh_tiny(), {"ink": adapter_files["ink"]}, directory=tmp_path, capacity=2)
    with pytest.raises(UnknownAdapter, match="unknown LoRA adapter 'nope'; known adapters: ink"):
        pool.acquire((("nope", 1.0),))
    with pytest.raises(UnknownAdapter):
        pool.acquire((("../ink", 1.0),))  # never a path out of the directory
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterUnloadable, match="broken.safetensors: not a LoRA adapter diffusers can read"):
        pool.acquire((("broken", 1.0),)).result()
    from diffusers import StableDiffusion3Pipeline

    with pytest.raises(ValueError, match="no such file"):
        read_adapter(StableDiffusion3Pipeline, tmp_path / "missing.safetensors")


def test_the_gate_runs_one_set_at_a_time_and_lets_no_set_starve() -> None:
    """Real threads through the gate: passes of one set overlap, passes of different sets never do, and a waiting
    set goes before newcomers of the running one."""
    active: list[object] = []
    state = {"running": {}, "overlap_mixed": False, "overlap_same": False}
    lock = threading.Lock()
    gate = AdapterGate(lambda adapter_set: active.append(adapter_set))

    def one_pass(adapter_set: tuple[tuple[str, float], ...]) -> None:
        with gate.use(adapter_set):
            with lock:
                running = state["running"]
                if any(k != adapter_set for k, v in running.items() if v):
                    state["overlap_mixed"] = True
                if running.get(adapter_set):
                    state["overlap_same"] = True
                running[adapter_set] = running.get(adapter_set, 0) + 1
            time.sleep(0.02)
            with lock:
                state["running"][adapter_set] -= 1

    a, b = (("a", 1.0),), (("b", 1.0),)
    with ThreadPoolExecutor(8) as executor:
        list(executor.map(lambda i: [one_pass(a if i % 2 else b) for _ in range(5)], range(8)))
    assert not state["overlap_mixed"], "passes with different adapter sets overlapped"
    assert state["overlap_same"], "passes with the same set never ran together"
    assert active[0] in (a, b) and len(active) >= 2


def test_a_switch_that_fails_fails_its_pass_only_and_the_next_one_switches_again() -> None:
    calls: list[object] = []

    def activate(adapter_set: tuple[tuple[str, float], ...]) -> None:
        calls.append(adapter_set)
        if adapter_set == (("bad", 1.0),):
            raise RuntimeError("the adapter layers refused")

    gate = AdapterGate(activate)
    bad, good = (("bad", 1.0),), (("good", 1.0),)
    with pytest.raises(RuntimeError, match="refused"), gate.use(bad):
        pass
    done = threading.Event()

    def other() -> None:
        with gate.use(good):
            done.set()

    threading.Thread(target=other, daemon=True).start()
    assert done.wait(10), "a pass after a failed switch never ran"
    assert calls == [bad, good]
