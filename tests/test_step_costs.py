"""The step engine's cost model, its calibration, the batch cap, the order of a burst and the parallel loops.

The devices here are real: the tiny transformer, wrapped so that each pass really takes a given time (it runs the
real pass, then sleeps the rest), or a cost model fed with pass times shaped like measured ones and then frozen,
so that the real passes of a loaded test machine cannot move the cap under the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from engine import GenerationRequest
from engine.calibrate import loop_candidates
from engine.costs import CostModel
from engine.step import StepRunner
from engine.threads import pipeline_runner
from utils import RequestScopedPipeline

CPU = torch.device("cpu")
GROUP = (8, 8)  # latents of a 64x64 image: the tiny model's default size, which the calibration measures


def _noop(step: int, latents: Any = None) -> None:
    pass


def _req(i: int, steps: int = 3, size: int = 64) -> GenerationRequest:
    # Guided (the default guidance): two samples per pass.
    return GenerationRequest(f"a lighthouse {i}", steps, 1, 900 + i, size, size, request_id=f"c{i}")


def _burst(runner: StepRunner, requests: list[GenerationRequest], hook: Callable | None = None) -> list[Any]:
    start = threading.Barrier(len(requests))

    def one(request: GenerationRequest) -> Any:
        start.wait(timeout=30)
        return runner(request, hook(request) if hook else _noop)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


class _TimedDevice:
    """The tiny transformer on a device where a pass of ``size`` samples takes ``seconds(size)``: the real pass
    runs, then the wrapper computes for the rest of that time, in the calling thread's CPU time: what a loop of one
    CPU thread times its passes by (engine.costs.pass_clock), so that this machine's other work cannot move it."""

    def __init__(self, transformer: Any, seconds: Callable[[int], float]) -> None:
        self.transformer = transformer
        self.seconds = seconds
        self.sizes: list[int] = []

    def __call__(self, **kwargs: Any) -> Any:
        started = time.thread_time()
        out = self.transformer(**kwargs)
        size = kwargs["hidden_states"].shape[0]
        self.sizes.append(size)
        while time.thread_time() - started < self.seconds(size):
            pass
        return out


@pytest.fixture(scope="module")
def scoped(tiny_pipeline: Any) -> RequestScopedPipeline:
    return RequestScopedPipeline(tiny_pipeline)


def test_the_knee_is_the_smallest_batch_within_the_tolerance_of_the_best_rate() -> None:
    costs = CostModel(32, tolerance=0.1)
    # Shaped like a busy device: 10 ms up to 4 samples, then the time grows with the batch.
    times = {1: 0.010, 2: 0.010, 4: 0.010, 8: 0.019, 16: 0.040, 32: 0.085}
    for size, seconds in times.items():
        for _ in range(3):  # the first pass of a cell is a warm-up, not counted
            costs.record(GROUP, size, seconds)
    assert costs.pass_time(GROUP, 8) == pytest.approx(0.019)
    assert costs.best_batch(GROUP) == 4  # 8 gives 421 samples/s, 4 gives 400: within 10%, and sooner
    assert costs.best_batch((16, 16)) is None
    table = costs.table(lambda g: f"{g[0] * 8}x{g[1] * 8}")
    assert table["64x64"]["best_batch"] == 4 and table["64x64"]["passes"]["8"]["counted"] == 2


def test_within_the_knee_a_short_queue_gets_smaller_quicker_passes() -> None:
    costs = CostModel(32, probe_every=0)
    times = {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.024, 16: 0.040, 32: 0.080}  # the rate grows until 16
    for size, seconds in times.items():
        for _ in range(2):
            costs.record(GROUP, size, seconds)
    assert costs.best_batch(GROUP) == 16
    # 8 samples waiting: two waves of 4 (at 16 and 32 ms) finish them on average as soon as one pass of 8 (24 ms),
    # and far sooner than the knee's pass (40 ms); 64 waiting: the knee's rate wins.
    assert costs.batch_limit(GROUP, waiting=8) <= 8
    assert costs.batch_limit(GROUP, waiting=64) == 16
    assert costs.batch_limit(GROUP) == 16


def test_pass_times_are_a_recent_median_and_the_first_pass_is_a_warm_up() -> None:
    costs = CostModel(8, window=5)
    costs.record(GROUP, 2, 5.0)  # warm-up: compilation, allocations
    assert costs.pass_time(GROUP, 2) is None
    costs.record(GROUP, 2, 0.010)
    costs.record(GROUP, 2, 0.012)
    assert costs.pass_time(GROUP, 2) == pytest.approx(0.011)
    costs.record(GROUP, 2, 1.0)  # stalled by other work: the median of three is a good pass, never the stall
    assert costs.pass_time(GROUP, 2) == pytest.approx(0.012)
    costs.record(GROUP, 2, 0.011)
    costs.record(GROUP, 2, 0.011)
    assert costs.pass_time(GROUP, 2) == pytest.approx(0.011)
    # The device got slower at 8: the knee moves down once the slow passes are most of the window (five here).
    for size, seconds in ((4, 0.016), (4, 0.016), *[(8, 0.02)] * 4):
        costs.record(GROUP, size, seconds)
    assert costs.best_batch(GROUP) == 8
    for _ in range(2):
        costs.record(GROUP, 8, 0.08)
    assert costs.best_batch(GROUP) == 8  # three fast passes of five: still the median
    costs.record(GROUP, 8, 0.08)
    assert costs.best_batch(GROUP) == 4


def test_an_unknown_group_is_explored_by_doubling_and_then_held_at_its_knee() -> None:
    costs = CostModel(16, probe_every=0)
    assert costs.batch_limit(GROUP) == 1
    seen = []
    for _ in range(24):
        limit = costs.batch_limit(GROUP)
        seen.append(limit)
        size = limit  # a loop with enough waiting fills the limit
        costs.record(GROUP, size, 0.010 if size <= 4 else 0.003 * size)  # flat up to 4, then slower per sample
    # Each size: a warm-up pass, then three counted before the next is tried; 8 showed no gain: 16 is never tried.
    assert seen == [1] * 4 + [2] * 4 + [4] * 4 + [8] * 4 + [4] * 8, seen
    assert costs.batch_limit(GROUP) == 4
    fixed = CostModel(16, learn=False)
    fixed.record(GROUP, 2, 1.0)
    assert fixed.batch_limit(GROUP) == 16 and fixed.best_batch(GROUP) is None


def test_one_lucky_pass_does_not_send_the_exploration_past_the_knee() -> None:
    """On a shared machine one pass may run while nothing else does: judged on it alone, a size past the knee
    would look like a gain, and the next, dearest size would be tried. A size is judged on the median of three."""
    costs = CostModel(16, probe_every=0)
    # Flat from 2 on (200 samples/s); the first counted pass of 4 ran alone (333/s).
    passes = {1: [0.010] * 4, 2: [0.010] * 16, 4: [0.020, 0.012, 0.020, 0.021]}
    limits = []
    for _ in range(16):
        limits.append(costs.batch_limit(GROUP, waiting=32))
        costs.record(GROUP, limits[-1], passes[limits[-1]].pop(0))
    assert limits == [1] * 4 + [2] * 4 + [4] * 4 + [2] * 4, limits
    assert costs.best_batch(GROUP) == 2


def test_a_size_above_the_knee_is_probed_again_less_often_the_dearer_it_is() -> None:
    costs = CostModel(16, probe_every=10)
    times = {2: 0.010, 4: 0.010, 8: 0.040}  # a pass of 8 costs four of 4: probed every 40 passes
    for size, seconds in times.items():
        for _ in range(4):  # a warm-up and three counted: confirmed
            costs.record(GROUP, size, seconds)
    limits = []
    for _ in range(200):
        limits.append(costs.batch_limit(GROUP, waiting=16))
        costs.record(GROUP, limits[-1], times[limits[-1]])
    assert set(limits) == {4, 8} and 1 <= limits.count(8) <= 200 // 40, limits.count(8)
    assert costs.batch_limit(GROUP, waiting=4) == 4  # nothing waits beyond the knee: no probe


def test_a_slow_device_batches_less_than_a_fast_one(scoped: RequestScopedPipeline) -> None:
    """Calibrated at start-up on a wrapper that really takes the time: flat 100 ms a pass (a fast device with room
    for the batch), or 50 ms per sample (a device already busy at one sample). The same burst follows."""
    fast = _TimedDevice(scoped.pipeline.transformer, lambda size: 0.100)
    slow = _TimedDevice(scoped.pipeline.transformer, lambda size: 0.050 * size)
    largest = {}
    for name, device in (("fast", fast), ("slow", slow)):
        # One thread: a single-threaded pass is the least disturbed by a loaded machine (no OpenMP barrier).
        runner = StepRunner(scoped, CPU, max_batch_size=8, cpu_threads=1, transformer=device)
        try:
            assert runner.calibration is not None and runner.calibration.loops == 1
            calibrated = len(device.sizes)
            _burst(runner, [_req(i) for i in range(8)])
            stats = runner.stats
        finally:
            runner.close()
        largest[name] = max(device.sizes[calibrated:])
        assert stats["largest_pass"] == largest[name]
        knee = stats["costs"]["64x64"]["best_batch"]
        assert knee == 8 if name == "fast" else knee <= 2, stats["costs"]
    assert largest == {"fast": 8, "slow": 2}  # slow: one request (two samples) a pass, the least it can run


def _frozen(knee: int, max_batch: int = 32) -> CostModel:
    """A cost model fed with pass times flat up to ``knee`` samples and linear beyond, then frozen."""
    costs = CostModel(max_batch)
    size = 1
    while size <= max_batch:
        for _ in range(3):
            costs.record(GROUP, size, 0.010 * max(1.0, size / knee))
        size *= 2
    costs.learn = False
    return costs


def test_a_burst_past_the_knee_finishes_in_waves_closest_to_done_first(scoped: RequestScopedPipeline) -> None:
    runner = StepRunner(scoped, CPU, costs=_frozen(knee=4), calibrate=False)
    finished: dict[str, int] = {}
    lock = threading.Lock()

    def hook(request: GenerationRequest) -> Callable[..., None]:
        def on_step(index: int, latents: Any = None) -> None:
            if index == request.num_inference_steps - 1:  # called in the loop thread: its pass count is exact
                with lock:
                    finished[request.request_id] = runner.loop.stats()["passes"]

        return on_step

    holding = threading.Event()

    def hold(index: int, latents: Any = None) -> None:
        # A first request, in the loop thread, holds the loop until the burst has arrived: the burst then joins at
        # one pass, however slowly this machine encodes its prompts.
        holding.set()
        deadline = time.monotonic() + 300
        while runner.loop.arriving < 8 and time.monotonic() < deadline:
            time.sleep(0.005)

    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(runner, _req(99, steps=1), hold)
            assert holding.wait(300)
            _burst(runner, [_req(i, steps=5) for i in range(8)], hook)
            first.result(timeout=60)
        stats = runner.stats
    finally:
        runner.close()
    assert max(stats["pass_sizes"]) == 4, stats["pass_sizes"]  # two guided requests a pass: the knee
    done = sorted(finished.values())
    # After the first request's pass, four waves of two: each wave runs every pass to its end, then two more join.
    assert done == [6, 6, 11, 11, 16, 16, 21, 21], done


def test_parallel_loops_each_run_their_share_of_a_burst_on_their_share_of_the_cores(
    scoped: RequestScopedPipeline,
) -> None:
    runner = StepRunner(scoped, CPU, cpu_threads=2, loops=2, costs=CostModel(32, learn=False), calibrate=False)
    threads: dict[str, set[int]] = {}
    lock = threading.Lock()

    def hook(request: GenerationRequest) -> Callable[..., None]:
        def on_step(index: int, latents: Any = None) -> None:
            with lock:  # the loop thread that steps this request, and the torch threads it runs with
                threads.setdefault(threading.current_thread().name, set()).add(torch.get_num_threads())

        return on_step

    requests = [_req(i, steps=4, size=32) for i in range(6)]
    try:
        together = _burst(runner, requests, hook)
        each = [loop.stats()["passes"] for loop in runner.loops]
    finally:
        runner.close()
    assert threads == {"denoise-0": {1}, "denoise-1": {1}}, threads
    assert all(passes > 0 for passes in each) and runner.stats["loops"] == 2
    alone = pipeline_runner(scoped, CPU)
    for request, images in zip(requests, together, strict=True):
        want = np.stack([np.asarray(im, dtype=np.int16) for im in alone(request, _noop)])
        got = np.stack([np.asarray(im, dtype=np.int16) for im in images])
        assert np.abs(got - want).max() <= 2, request.request_id  # another thread count: a level at most


def test_the_calibration_measures_every_candidate_count_of_loops(scoped: RequestScopedPipeline) -> None:
    assert loop_candidates(None) == [1] and loop_candidates(2) == [1, 2] and loop_candidates(6) == [1, 2, 4]
    runner = StepRunner(scoped, CPU, max_batch_size=4, cpu_threads=2)
    try:
        calibration = runner.calibration
        assert calibration is not None
        assert set(calibration.candidates) == {1, 2} and all(rate > 0 for rate in calibration.candidates.values())
        assert calibration.loops in (1, 2) and len(runner.loops) == calibration.loops
        assert calibration.threads == 2 // calibration.loops
        assert runner.costs.best_batch(GROUP) is not None  # the chosen count's table is the runner's
    finally:
        runner.close()
