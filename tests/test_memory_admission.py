"""Admission by measured memory (engine.memory_admission, engine.memory_gate): a request that can never fit is refused
with the sizes that would, one waits while the memory is held, one that would wait too long is refused with a retry
time, a request that ran alone teaches the estimate; over HTTP: the 400, the 503 and the estimate in /api/status.

The costs are set by hand where a test needs them to bite (``FixedMeter`` reports a fixed free memory): nothing
depends on this machine's free memory. One test measures the process for real (the peak a runner adds)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from http_helpers import NATIVE, assert_envelope

from engine import Engine, GenerationRequest, MemoryWait, TooLargeForMemory
from engine.memory_admission import MemoryAdmission
from engine.memory_meter import MemoryMeter

MB = 2**20


class FixedMeter:
    """A meter with a fixed free memory, measuring nothing."""

    source = "fixed"

    def __init__(self, free: int) -> None:
        self._free = free

    def free(self) -> int:
        return self._free

    def measure(self, work: Callable[[], Any]) -> int:
        work()
        return 0


def _admission(budget: int, per_pixel: float, max_wait: float = 0.0) -> MemoryAdmission:
    admission = MemoryAdmission(FixedMeter(budget), max_wait=max_wait, size_multiple=16, max_side=1024)  # type: ignore[arg-type]
    admission.pass_per_pixel = per_pixel
    admission.measured_at = (32, 32)
    return admission


def _req(rid: str, side: int = 64, steps: int = 3, images: int = 1) -> GenerationRequest:
    return GenerationRequest(
        prompt="p", num_inference_steps=steps, num_images=images, seed=1, height=side, width=side, request_id=rid
    )


class HeldRunner:
    """Steps once (after ``first_step_s``), then holds until released."""

    def __init__(self, first_step_s: float = 0.0) -> None:
        self.first_step_s = first_step_s
        self.release = threading.Event()
        self.stepped = threading.Event()

    def __call__(self, request: GenerationRequest, on_step: Callable[..., None]) -> list[str]:
        time.sleep(self.first_step_s)
        on_step(0)
        self.stepped.set()
        self.release.wait(30)
        return [request.request_id]


def _engine(runner: Any, memory: MemoryAdmission, **kwargs: Any) -> Engine:
    engine = Engine(runner, release=lambda: None, memory=memory, max_concurrency=4, **kwargs)
    engine.set_ready()
    return engine


def test_a_request_that_can_never_fit_is_refused_at_once_with_the_sizes_that_would() -> None:
    # 100 bytes a pixel, both guidance halves: 512x512 needs 50 MiB of a 10 MiB budget; 16-multiples up to 224 fit.
    memory = _admission(10 * MB, 100.0)

    async def main() -> None:
        engine = _engine(HeldRunner(), memory)
        with pytest.raises(TooLargeForMemory) as refused:
            await engine.submit(_req("big", side=512, images=2))
        assert engine.active == 0 and engine.stats["rejected"] == 1
        engine.close()
        return refused.value.message

    message = asyncio.run(main())
    assert "2 image(s) of 512x512 need about 100 MiB" in message, message
    assert "1 image(s) of up to 224x224" in message and "2 image(s) of up to 160x160" in message, message


def test_requests_wait_while_the_memory_they_need_is_held() -> None:
    memory = _admission(10 * MB, 400.0)  # a guided 64x64 request: 3.1 MiB; three fit, the fourth waits

    async def main() -> None:
        runner = HeldRunner()
        engine = _engine(runner, memory)
        tasks = [asyncio.ensure_future(engine.submit(_req(str(i)))) for i in range(4)]
        while engine.active + engine.queued < 4:
            await asyncio.sleep(0.005)
        assert (engine.active, engine.queued) == (3, 1)  # four slots, memory for three
        assert engine.memory_held == 3 * memory.cost(64, 64, 1)
        runner.release.set()
        assert [len((await task).images) for task in tasks] == [1, 1, 1, 1]
        assert engine.memory_held == 0
        engine.close()

    asyncio.run(main())


def test_a_waiting_request_runs_once_alone_even_if_the_budget_shrank_meanwhile() -> None:
    memory = _admission(5 * MB, 400.0)  # a guided 64x64 request: 3.1 MiB; one at a time

    async def main() -> None:
        runner = HeldRunner()
        engine = _engine(runner, memory)
        first = asyncio.ensure_future(engine.submit(_req("first")))
        second = asyncio.ensure_future(engine.submit(_req("second")))
        while engine.queued < 1:
            await asyncio.sleep(0.005)
        memory.meter._free = 2 * MB  # type: ignore[attr-defined]  # other processes took memory meanwhile
        memory.refresh()
        runner.release.set()
        await first
        assert (await asyncio.wait_for(second, 10)).images == ["second"]  # alone, it runs: nothing else would free
        engine.close()

    asyncio.run(main())


def test_a_request_that_would_wait_too_long_for_memory_is_refused_with_a_retry_time() -> None:
    # One request holds the memory; it stepped once in 50 ms or more of its 40 steps: ~2 s or more to go.
    memory = _admission(4 * MB, 400.0, max_wait=0.5)

    async def main() -> None:
        runner = HeldRunner(first_step_s=0.05)
        engine = _engine(runner, memory)
        first = asyncio.ensure_future(engine.submit(_req("first", steps=40)))
        await asyncio.get_running_loop().run_in_executor(None, runner.stepped.wait, 30)
        with pytest.raises(MemoryWait) as refused:
            await engine.submit(_req("second"))
        runner.release.set()
        await first
        engine.close()
        return refused.value

    refusal = asyncio.run(main())
    assert refusal.wait > 0.5 and refusal.retry_after >= 1


def test_a_request_that_ran_alone_teaches_the_estimate_its_measured_peak() -> None:
    """The process's memory, measured for real: a runner that holds 256 MiB more than the model said."""
    memory = MemoryAdmission(MemoryMeter("cpu"), size_multiple=16, max_side=1024)
    memory.pass_per_pixel, memory.measured_at = 1.0, (32, 32)

    def runner(request: GenerationRequest, on_step: Callable[..., None]) -> list[str]:
        held = torch.ones(64 * MB)  # 256 MiB, touched
        on_step(0)
        return [str(float(held[-1]))]

    async def main() -> None:
        engine = _engine(runner, memory)
        await engine.submit(_req("alone"))
        engine.close()

    before = memory.cost(64, 64, 1)
    asyncio.run(main())
    assert before < MB and memory.cost(64, 64, 1) >= 200 * MB
    assert memory.cost(128, 128, 1) >= 200 * MB  # a larger request costs at least as much
    assert memory.status()["observed_runs"] == 1


def test_a_large_request_that_took_more_than_estimated_scales_the_estimates_a_small_one_does_not() -> None:
    memory = _admission(16 * 2**30, 100.0)  # a guided 1024x1024 image: 200 MiB estimated
    small = memory.cost(512, 512, 1)
    memory.observe(_req("small", side=64), 300 * MB)  # far over its 0.8 MiB estimate: noise, no ratio
    assert memory.scale == 1.0 and memory.cost(512, 512, 1) == 300 * MB  # the floor: larger requests cost as much
    memory.observe(_req("large", side=1024), 400 * MB)  # twice its estimate
    assert memory.scale == 2.0 and memory.cost(2048, 2048, 1) == 2 * _admission(16 * 2**30, 100.0).cost(2048, 2048, 1)
    assert memory.cost(512, 512, 1) == max(2 * small, 300 * MB)


def test_the_server_measures_at_start_up_and_refuses_what_can_never_fit(make_server: Callable[..., Any]) -> None:
    live = make_server(memory_budget=64 * MB, memory_reserve=0, default_steps=2)
    status = httpx.get(live.url + "/api/status").json()["memory_admission"]
    assert status["budget_bytes"] == 64 * MB and status["measured_at"] == "32x32"
    # Never less than what the work must hold (a process's RSS may not move when freed memory is reused).
    assert status["pass_bytes_per_pixel"] > 0 and status["decode_bytes_per_pixel"] >= 12
    costs = status["image_cost_bytes"]  # the default size and the largest side served
    assert set(costs) == {"64x64", "1024x1024"} and 0 < costs["64x64"] < costs["1024x1024"]
    live.engine.memory.pass_per_pixel = 100.0  # deterministic from here: 64 MiB holds 2 x 128 x 400x400 pixels
    live.engine.memory.decode_per_pixel = 0.0
    body = {"prompt": "x", "width": 1024, "height": 1024, "num_images_per_prompt": 2}
    error = assert_envelope(httpx.post(live.url + NATIVE, json=body, timeout=60), 400, "num_images_per_prompt")
    assert "what fits: 1 image(s) of up to 576x576; 2 image(s) of up to 400x400" in error["message"], error["message"]
    assert httpx.post(live.url + NATIVE, json={"prompt": "x"}, timeout=60).status_code == 200


def test_a_memory_wait_is_a_503_with_its_retry_after() -> None:
    from api.generation import as_api_error

    error = as_api_error(MemoryWait(12.3, 13), engine=None, request_timeout=300)
    assert (error.status, error.code, error.headers) == (503, "memory_wait", {"Retry-After": "13"})


def test_without_memory_admission_the_status_says_so(make_server: Callable[..., Any]) -> None:
    live = make_server(memory_admission="off")
    assert live.engine.memory is None
    assert httpx.get(live.url + "/api/status").json()["memory_admission"] is None
