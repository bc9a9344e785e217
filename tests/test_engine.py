"""The engine on its own: FIFO slots, a bounded queue, deadlines and cancellation, with a stepping runner."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from engine import (
    ClientGone,
    Engine,
    GenerationRequest,
    GenerationTimeout,
    NotReady,
    OutOfMemory,
    Overloaded,
    ProgressEvent,
    TooLarge,
)


class SteppingRunner:
    """A runner that 'denoises' in steps of `step_s` seconds, recording what ran."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.started: list[str] = []
        self.steps: dict[str, int] = {}
        self._lock = threading.Lock()  # protects the records: several worker threads write them

    def __call__(self, request: GenerationRequest, on_step: Callable[[int], None]) -> list[str]:
        with self._lock:
            self.started.append(request.request_id)
            self.steps[request.request_id] = 0
        for step in range(request.num_inference_steps):
            time.sleep(self.step_s)
            with self._lock:
                self.steps[request.request_id] += 1
            on_step(step)
        return [f"image-{request.request_id}"] * request.num_images


def _req(rid: str, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(
        prompt="p", num_inference_steps=steps, num_images=1, seed=1, height=64, width=64, request_id=rid
    )


def _engine(runner: SteppingRunner, **kwargs: object) -> Engine:
    engine = Engine(runner, release=lambda: None, **kwargs)  # type: ignore[arg-type]
    engine.set_ready()
    return engine


async def _settle(engine: Engine) -> None:
    while engine.active or engine.queued:
        await asyncio.sleep(0.005)


def test_not_ready_until_set_ready_and_while_draining() -> None:
    async def main() -> None:
        engine = Engine(SteppingRunner(), release=lambda: None)
        with pytest.raises(NotReady, match="loading"):
            await engine.submit(_req("a"))
        engine.set_ready()
        assert (await engine.submit(_req("b"))).images == ["image-b"]
        engine.start_draining()
        with pytest.raises(NotReady, match="draining"):
            await engine.submit(_req("c"))
        engine.close()

    asyncio.run(main())


def test_fifo_order_and_overload_without_work() -> None:
    async def main() -> None:
        runner = SteppingRunner()
        engine = _engine(runner, max_concurrency=1, max_queue=3)
        tasks = [asyncio.create_task(engine.submit(_req(f"r{i}"))) for i in range(4)]
        await asyncio.sleep(0)  # all four admitted or queued, in order
        assert engine.active == 1 and engine.queued == 3
        with pytest.raises(Overloaded):
            await engine.submit(_req("too-many"))
        results = await asyncio.gather(*tasks)
        assert [r.images[0] for r in results] == [f"image-r{i}" for i in range(4)]
        assert runner.started == ["r0", "r1", "r2", "r3"]  # first come, first served
        assert "too-many" not in runner.started  # the overload answer did no work
        await _settle(engine)
        assert engine.stats["completed"] == 4 and engine.stats["rejected"] == 1
        # Queue wait is reported: the last one waited for the three before it.
        assert results[3].queued_s > results[0].queued_s
        engine.close()

    asyncio.run(main())


def test_timeout_stops_at_next_step_and_frees_the_slot() -> None:
    async def main() -> None:
        runner = SteppingRunner(step_s=0.02)
        engine = _engine(runner, max_concurrency=1, request_timeout=0.1)
        with pytest.raises(GenerationTimeout):
            await engine.submit(_req("slow", steps=1000))
        await _settle(engine)
        assert engine.active == 0
        assert runner.steps["slow"] < 20  # stopped within a step or two of the deadline, not after 1000
        engine.request_timeout = 0
        assert (await engine.submit(_req("next"))).images == ["image-next"]  # the slot was freed
        assert engine.stats["timed_out"] == 1
        engine.close()

    asyncio.run(main())


def test_client_gone_while_running_and_while_queued() -> None:
    async def main() -> None:
        runner = SteppingRunner(step_s=0.02)
        engine = _engine(runner, max_concurrency=1)
        gone_running, gone_queued = asyncio.Event(), asyncio.Event()
        running = asyncio.create_task(engine.submit(_req("running", steps=1000), gone_running))
        queued = asyncio.create_task(engine.submit(_req("queued", steps=5), gone_queued))
        await asyncio.sleep(0.1)
        assert engine.active == 1 and engine.queued == 1
        gone_queued.set()
        with pytest.raises(ClientGone):
            await queued
        assert engine.queued == 0
        gone_running.set()
        with pytest.raises(ClientGone):
            await running
        await _settle(engine)
        assert "queued" not in runner.started  # a queued request whose client left never ran
        assert runner.steps["running"] < 50
        assert engine.stats["disconnected"] == 2
        engine.close()

    asyncio.run(main())


def test_out_of_memory_is_reported_and_the_engine_recovers() -> None:
    calls = {"n": 0}

    def runner(request: GenerationRequest, on_step: Callable[[int], None]) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("cannot allocate")
        return ["ok"]

    async def main() -> None:
        engine = Engine(runner, release=lambda: None)
        engine.set_ready()
        with pytest.raises(OutOfMemory):
            await engine.submit(_req("a"))
        assert (await engine.submit(_req("b"))).images == ["ok"]
        assert engine.stats["out_of_memory"] == 1
        engine.close()

    asyncio.run(main())


def test_release_runs_only_when_idle() -> None:
    async def main() -> None:
        runner = SteppingRunner()
        seen: list[int] = []
        engine = Engine(runner, max_concurrency=2, release=lambda: seen.append(engine.active))
        engine.set_ready()
        await asyncio.gather(*(engine.submit(_req(f"r{i}")) for i in range(6)))
        await _settle(engine)
        await asyncio.sleep(0.05)
        assert seen and set(seen) == {0}
        engine.close()

    asyncio.run(main())


def test_cpu_cores_are_split_evenly_and_fixed_per_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    calls: list[tuple[str, int]] = []
    lock = threading.Lock()  # protects calls

    def record(n: int) -> None:
        with lock:
            calls.append((threading.current_thread().name, n))

    monkeypatch.setattr(torch, "set_num_threads", record)

    async def main(**kwargs: object) -> None:
        engine = _engine(SteppingRunner(), **kwargs)
        await engine.submit(_req("alone"))  # alone or not, a slot's share is the same: images stay reproducible
        await asyncio.gather(*(engine.submit(_req(f"r{i}")) for i in range(4)))
        engine.close()

    asyncio.run(main(max_concurrency=2, cpu_threads=4))
    assert {n for _, n in calls} == {2}
    assert len(calls) == len({thread for thread, _ in calls}) <= 2  # once per worker thread, never per request
    calls.clear()
    asyncio.run(main(max_concurrency=2))  # cpu_threads=None: torch's setting is left alone
    assert calls == []


class LatentRunner(SteppingRunner):
    """A stepping runner that hands the callback a 'latents' tensor whose value is the step index."""

    def __call__(self, request: GenerationRequest, on_step: Callable[..., None]) -> list[str]:
        import torch

        for step in range(request.num_inference_steps):
            time.sleep(self.step_s)
            on_step(step, torch.full((request.num_images, 2, 2, 2), float(step)))
        return [f"image-{request.request_id}"] * request.num_images


def test_progress_reports_queue_positions_start_and_steps_on_the_loop_thread() -> None:
    async def main() -> None:
        engine = _engine(SteppingRunner(step_s=0.02), max_concurrency=1, max_queue=4)
        events: dict[str, list[tuple[str, ProgressEvent]]] = {"a": [], "b": [], "c": []}

        def listener(name: str) -> Callable[[ProgressEvent], None]:
            return lambda event: events[name].append((threading.current_thread().name, event))

        tasks = [
            asyncio.create_task(engine.submit(_req(name, steps=3), progress=listener(name))) for name in ("a", "b", "c")
        ]
        await asyncio.gather(*tasks)
        main_thread = threading.current_thread().name
        assert {thread for seen in events.values() for thread, _ in seen} == {main_thread}
        kinds = {name: [(e.type, e.position, e.step) for _, e in seen] for name, seen in events.items()}
        steps = [("step", None, 1), ("step", None, 2), ("step", None, 3)]
        assert kinds["a"] == [("started", None, None), *steps]  # a slot was free: never queued
        assert kinds["b"] == [("queued", 1, None), ("started", None, None), *steps]
        # c waited behind b, then moved up when b took the slot.
        assert kinds["c"] == [("queued", 2, None), ("queued", 1, None), ("started", None, None), *steps]
        last = events["a"][-1][1]
        assert last.total == 3 and last.elapsed_s is not None and last.elapsed_s > 0
        assert last.to_dict() == {"type": "step", "step": 3, "total": 3, "elapsed_s": round(last.elapsed_s, 3)}
        engine.close()

    asyncio.run(main())


def test_queue_positions_move_up_when_a_waiter_leaves() -> None:
    async def main() -> None:
        engine = _engine(SteppingRunner(step_s=0.02), max_concurrency=1, max_queue=4)
        seen: list[int | None] = []
        running = asyncio.create_task(engine.submit(_req("running", steps=20)))
        gone = asyncio.Event()
        first = asyncio.create_task(engine.submit(_req("first", steps=1), gone))
        second = asyncio.create_task(engine.submit(_req("second", steps=1), progress=lambda e: seen.append(e.position)))
        await asyncio.sleep(0.05)
        assert seen == [2]
        gone.set()
        with pytest.raises(ClientGone):
            await first
        assert seen == [2, 1]
        await asyncio.gather(running, second)
        engine.close()

    asyncio.run(main())


def test_previews_every_n_steps_never_after_the_last_and_a_failing_previewer_is_harmless() -> None:
    async def main(previewer: Callable[..., list[object]]) -> list[ProgressEvent]:
        engine = Engine(LatentRunner(step_s=0.001), release=lambda: None, previewer=previewer)
        engine.set_ready()
        events: list[ProgressEvent] = []
        request = _req("p", steps=7)
        request.preview_every = 3
        result = await engine.submit(request, progress=events.append)
        assert result.images == ["image-p"]
        engine.close()
        return [e for e in events if e.type == "step"]

    steps = asyncio.run(main(lambda latents: [f"preview-of-step-{int(latents.flatten()[0])}"]))
    previews = {e.step: e.previews for e in steps if e.previews is not None}
    assert previews == {3: ["preview-of-step-2"], 6: ["preview-of-step-5"]}  # after steps 3 and 6; 7 is the image

    def broken(latents: object) -> list[object]:
        raise RuntimeError("preview bug")

    steps = asyncio.run(main(broken))
    assert len(steps) == 7 and all(e.previews is None for e in steps)


def test_listeners_hear_every_outcome_on_the_loop_and_cannot_change_it() -> None:
    async def main() -> None:
        engine = Engine(SteppingRunner(), max_concurrency=1, max_queue=0, release=lambda: None)
        heard: list[tuple[str, object, bool]] = []
        loop_thread = threading.get_ident()

        def listener(request: GenerationRequest, outcome: object) -> None:
            heard.append((request.request_id, outcome, threading.get_ident() == loop_thread))

        def broken(request: GenerationRequest, outcome: object) -> None:
            raise RuntimeError("a broken observer")

        engine.listeners += [broken, listener]
        with pytest.raises(NotReady):
            await engine.submit(_req("early"))
        engine.set_ready()
        running = asyncio.create_task(engine.submit(_req("ok")))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await engine.submit(_req("overflow"))
        result = await running
        assert result.images == ["image-ok"]  # the broken listener changed nothing
        assert [(rid, type(outcome), on_loop) for rid, outcome, on_loop in heard] == [
            ("early", NotReady, True),
            ("overflow", Overloaded, True),
            ("ok", type(result), True),
        ]
        assert heard[2][1] is result
        engine.close()

    asyncio.run(main())


def _sized(rid: str, n: int, steps: int = 3) -> GenerationRequest:
    """A 64x64 request for ``n`` images: n units of 64 x 64 pixels."""
    return GenerationRequest(
        prompt="p", num_inference_steps=steps, num_images=n, seed=1, height=64, width=64, request_id=rid
    )


UNIT = 64 * 64


def test_a_pixel_budget_runs_what_fits_and_queues_the_rest_in_order() -> None:
    """Three free slots, but a budget of two 64x64 images: the third waits for pixels, not for a slot; a request
    larger than the whole budget is refused at once, without work."""

    async def main() -> None:
        runner = SteppingRunner(step_s=0.02)
        engine = _engine(runner, max_concurrency=3, max_queue=8, max_pixels=2 * UNIT)
        first = asyncio.create_task(engine.submit(_sized("a", 1, steps=10)))
        others = [asyncio.create_task(engine.submit(_sized(rid, 1, steps=3))) for rid in ("b", "c")]
        await asyncio.sleep(0.05)
        assert (engine.active, engine.queued, engine.pixels_running) == (2, 1, 2 * UNIT)
        assert runner.started == ["a", "b"]
        with pytest.raises(TooLarge) as refused:
            await engine.submit(_sized("huge", 3))
        assert (refused.value.pixels, refused.value.budget) == (3 * UNIT, 2 * UNIT)
        await asyncio.gather(first, *others)
        assert runner.started == ["a", "b", "c"] and "huge" not in runner.started
        await _settle(engine)
        assert engine.pixels_running == 0
        assert engine.stats["completed"] == 3 and engine.stats["rejected"] == 1 and engine.stats["failed"] == 0
        engine.close()

    asyncio.run(main())


def test_a_head_that_does_not_fit_holds_the_queue_and_its_leaving_lets_the_others_start() -> None:
    """FIFO under a budget: a small request does not overtake a large one waiting for pixels (the large one would
    starve); once the large one leaves the queue, the small one starts at once, beside what is running."""

    async def main() -> None:
        runner = SteppingRunner(step_s=0.02)
        engine = _engine(runner, max_concurrency=4, max_queue=8, max_pixels=4 * UNIT)
        stop_running = asyncio.Event()
        running = asyncio.create_task(engine.submit(_sized("three", 3, steps=1000), stop_running))
        await asyncio.sleep(0.05)
        gone = asyncio.Event()
        large = asyncio.create_task(engine.submit(_sized("two", 2), gone))
        small = asyncio.create_task(engine.submit(_sized("one", 1)))
        await asyncio.sleep(0.1)
        assert runner.started == ["three"]  # "one" would fit (3 + 1 <= 4) but waits behind "two"
        assert (engine.active, engine.queued) == (1, 2)
        gone.set()
        with pytest.raises(ClientGone):
            await large
        assert (await small).images == ["image-one"]
        assert not running.done()  # it started beside the running request, not after it
        assert runner.started == ["three", "one"]
        stop_running.set()
        with pytest.raises(ClientGone):
            await running
        await _settle(engine)
        assert (engine.active, engine.pixels_running) == (0, 0)
        engine.close()

    asyncio.run(main())
