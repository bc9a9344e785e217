"""On a CPU the step engine's passes and its decodes share the cores, a decode first (engine/cores.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from engine import GenerationRequest
from engine.cores import Cores
from engine.costs import CostModel
from engine.step import StepRunner
from utils import RequestScopedPipeline

CPU = torch.device("cpu")


def _compute(seconds: float) -> None:
    """Work for ``seconds`` of this thread's CPU time (what a core spends, however the machine is loaded)."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


class _Running:
    """Counts the passes and decodes running at once; keeps the most seen together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = {"pass": 0, "decode": 0}
        self.most = 0
        self.decodes_beside_a_pass = 0

    def enter(self, kind: str) -> None:
        with self._lock:
            self.now[kind] += 1
            self.most = max(self.most, sum(self.now.values()))
            self.decodes_beside_a_pass += kind == "decode" and self.now["pass"] > 0

    def leave(self, kind: str) -> None:
        with self._lock:
            self.now[kind] -= 1


@pytest.fixture
def counted(tiny_pipeline: Any) -> Iterator[tuple[RequestScopedPipeline, Any, _Running]]:
    """The tiny pipeline whose transformer passes (10 ms) and VAE decodes (40 ms) are counted while they run."""
    running = _Running()
    vae = tiny_pipeline.vae
    decode = vae.decode

    def counted_decode(*args: Any, **kwargs: Any) -> Any:
        running.enter("decode")
        try:
            _compute(0.040)
            return decode(*args, **kwargs)
        finally:
            running.leave("decode")

    def transformer(**kwargs: Any) -> Any:
        running.enter("pass")
        try:
            _compute(0.010)
            return tiny_pipeline.transformer(**kwargs)
        finally:
            running.leave("pass")

    vae.decode = counted_decode
    try:
        yield RequestScopedPipeline(tiny_pipeline), transformer, running
    finally:
        del vae.decode  # the instance attribute: the class's method again


def test_passes_and_decodes_never_run_on_more_cores_than_there_are(counted: Any) -> None:
    scoped, transformer, running = counted
    runner = StepRunner(
        scoped, CPU, cpu_threads=2, loops=2, costs=CostModel(32, learn=False), calibrate=False, transformer=transformer
    )
    # Different step counts: requests leave the loops, and decode, while the others still step.
    requests = [GenerationRequest(f"a fox {i}", 2 + i, 1, 40 + i, 32, 32, request_id=f"k{i}") for i in range(8)]
    start = threading.Barrier(len(requests))

    def one(request: GenerationRequest) -> Any:
        start.wait(timeout=30)
        return runner(request, lambda *_: None)

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            images = list(pool.map(one, requests))
    finally:
        runner.close()
    assert all(len(each) == 1 for each in images)
    # Two one-thread loops and the decodes, on two cores: never three at once (without engine.cores, two passes
    # and a decode ran together as soon as the first request left its loop).
    assert running.most <= 2, running.most
    assert running.decodes_beside_a_pass > 0  # the other loop went on while one request decoded: nothing idles


def test_a_waiting_decode_goes_before_waiting_passes() -> None:
    cores = Cores(1)
    order: list[str] = []
    held = threading.Event()
    release = threading.Event()

    def first_pass() -> None:
        with cores.passing(1):
            held.set()
            release.wait(10)

    def later(kind: str) -> None:
        with cores.passing(1) if kind == "pass" else cores.decoding():
            order.append(kind)

    workers = [threading.Thread(target=first_pass)]
    workers[0].start()
    assert held.wait(10)
    for kind in ("pass", "decode"):  # the pass asks first, the decode after it
        workers.append(threading.Thread(target=later, args=(kind,)))
        workers[-1].start()
        time.sleep(0.1)
    release.set()
    for worker in workers:
        worker.join(10)
    assert order == ["decode", "pass"] and cores.free == 1
    with cores.passing(8):  # a loop of more threads than the machine has takes them all, and does not wait forever
        assert cores.free == 0


def test_a_request_decodes_on_the_core_its_last_pass_gave_up(counted: Any) -> None:
    """One one-thread loop on one core: when a request takes its last step, its decode runs next, before the loop's
    next pass for the others (the loop promises the core as it finishes the request, engine.cores)."""
    scoped, transformer, running = counted
    events: list[Any] = []
    inner = transformer

    def logged(**kwargs: Any) -> Any:
        events.append(kwargs["hidden_states"].shape[0])  # samples in the pass: 4 while both requests run
        return inner(**kwargs)

    decode = scoped.pipeline.vae.decode

    def logged_decode(*args: Any, **kwargs: Any) -> Any:
        events.append("decode")
        return decode(*args, **kwargs)

    scoped.pipeline.vae.decode = logged_decode
    runner = StepRunner(
        scoped, CPU, cpu_threads=1, loops=1, costs=CostModel(32, learn=False), calibrate=False, transformer=logged
    )
    long = GenerationRequest("a long walk", 12, 1, 7, 32, 32, request_id="long")
    short = GenerationRequest("a short hop", 2, 1, 8, 32, 32, request_id="short")
    stepping = threading.Event()
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(runner, long, lambda *_: stepping.set())
            assert stepping.wait(30)
            pool.submit(runner, short, lambda *_: None).result(timeout=60)
            first.result(timeout=60)
    finally:
        runner.close()
        scoped.pipeline.vae.decode = decode  # the fixture's counted decode (it removes it in turn)
    together = [i for i, event in enumerate(events) if event == 4]
    assert len(together) == 2, events  # the short request's two steps, batched with the long one's
    assert events[together[-1] + 1] == "decode", events  # its decode, not the long request's next pass
    assert events.count("decode") == 2 and running.most <= 1
