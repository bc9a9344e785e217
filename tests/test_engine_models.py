"""The engine with several models (engine.served, engine.fair_queue): each request on its own model's runner, held
while it runs; slots and the queue shared fairly, so that a burst for one model never starves another."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from engine import Engine, GenerationRequest, GenerationTimeout, Overloaded, ProgressEvent
from engine.fair_queue import FairQueue
from engine.served import Served


class ModelRunner:
    """A runner of one model that 'denoises' in steps of ``step_s`` seconds, recording into a shared log which
    request started on which model."""

    def __init__(self, name: str, log: list[str], lock: threading.Lock, step_s: float = 0.02) -> None:
        self.name, self.log, self.lock, self.step_s = name, log, lock, step_s

    def __call__(self, request: GenerationRequest, on_step: Callable[[int], None]) -> list[str]:
        with self.lock:
            self.log.append(request.request_id)
        for step in range(request.num_inference_steps):
            time.sleep(self.step_s)
            on_step(step)
        return [f"{self.name}:{request.request_id}"]


class Source:
    """A model source over fixed models; ``loading[name]`` (a future) makes a hold wait for that 'load'."""

    def __init__(self, served: dict[str, Served]) -> None:
        self.served = served
        self.loading: dict[str, asyncio.Future[None]] = {}
        self.held: dict[str, int] = dict.fromkeys(served, 0)  # requests holding each model now

    @contextlib.asynccontextmanager
    async def hold(self, name: str, wait: Any, progress: Any) -> AsyncIterator[Served]:
        if name in self.loading:
            if progress is not None:
                progress(ProgressEvent("loading", model=name))
            await wait(asyncio.shield(self.loading[name]))
        self.held[name] += 1
        try:
            yield self.served[name]
        finally:
            self.held[name] -= 1


def _req(rid: str, model: str, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(
        prompt="p", num_inference_steps=steps, num_images=1, seed=1, height=64, width=64, request_id=rid, model=model
    )


def _engine(step_s: float = 0.02, **kwargs: Any) -> tuple[Engine, Source, list[str]]:
    log: list[str] = []
    lock = threading.Lock()
    source = Source({m: Served(ModelRunner(m, log, lock, step_s), name=m) for m in ("a", "b")})
    engine = Engine(None, release=lambda: None, models=source, **kwargs)  # type: ignore[arg-type]
    engine.set_ready()
    return engine, source, log


def test_each_request_runs_on_its_models_runner_and_holds_it_while_it_runs() -> None:
    async def main() -> None:
        engine, source, _ = _engine(max_concurrency=2)
        seen: list[dict[str, int]] = []

        async def watch() -> None:
            while engine.active == 0:
                await asyncio.sleep(0.002)
            seen.append(dict(source.held))

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(engine.submit(_req("1", "a")), engine.submit(_req("2", "b")))
        await watcher
        assert [r.images for r in results] == [["a:1"], ["b:2"]]
        assert seen[0] == {"a": 1, "b": 1}, "a running request did not hold its model"
        assert source.held == {"a": 0, "b": 0}, "a model stayed held after its request ended"
        engine.close()

    asyncio.run(main())


def test_a_free_slot_goes_to_the_model_running_fewest() -> None:
    """One slot, six of a's requests queued before one of b's: b's starts second, not seventh (a plain FIFO would
    start it last)."""

    async def main() -> None:
        engine, _, log = _engine(max_concurrency=1, max_queue=16)
        burst = [asyncio.create_task(engine.submit(_req(f"a{i}", "a"))) for i in range(6)]
        await asyncio.sleep(0.01)
        late = asyncio.create_task(engine.submit(_req("b0", "b")))
        await asyncio.gather(*burst, late)
        assert log[:2] == ["a0", "b0"], log
        assert log[2:] == [f"a{i}" for i in range(1, 6)], "within a model, first come first served"
        engine.close()

    asyncio.run(main())


def test_a_burst_filling_the_queue_does_not_lock_another_model_out() -> None:
    """One slot, a queue of four, all of it a's: b's request takes the place of a's newest (which is answered as a
    full queue answers), and runs next. Without the fair queue b would be refused."""

    async def main() -> None:
        engine, _, log = _engine(max_concurrency=1, max_queue=4)
        burst = [asyncio.create_task(engine.submit(_req(f"a{i}", "a"))) for i in range(5)]
        await asyncio.sleep(0.01)
        assert engine.queued == 4
        with pytest.raises(Overloaded):
            await engine.submit(_req("a5", "a"))  # a holds the whole queue: its own newcomer is refused
        late = asyncio.create_task(engine.submit(_req("b0", "b")))
        outcomes = await asyncio.gather(*burst, late, return_exceptions=True)
        assert isinstance(outcomes[4], Overloaded), "a's newest waiter kept its place"
        assert outcomes[5].images == ["b:b0"]
        assert log == ["a0", "b0", "a1", "a2", "a3"]
        # One model, full: the newcomer is refused, as before (nobody else's place to take).
        engine.close()

    asyncio.run(main())


def test_queue_positions_follow_the_fair_order() -> None:
    async def main() -> None:
        engine, _, _ = _engine(max_concurrency=1, max_queue=16)
        told: dict[str, list[int]] = {"a2": [], "b0": []}

        def positions(rid: str) -> Callable[[ProgressEvent], None]:
            return lambda event: told[rid].append(event.position) if event.type == "queued" else None

        tasks = [asyncio.create_task(engine.submit(_req("a0", "a")))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(engine.submit(_req("a1", "a"))))
        tasks.append(asyncio.create_task(engine.submit(_req("a2", "a"), progress=positions("a2"))))
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(engine.submit(_req("b0", "b"), progress=positions("b0"))))
        await asyncio.gather(*tasks)
        assert told["b0"][0] == 1, "b's request, next to start, was told another place"
        assert told["a2"][:2] == [2, 3], "a's last request was not told that b's went ahead of it"
        engine.close()

    asyncio.run(main())


def test_a_model_loading_is_waited_for_without_a_slot_and_shown() -> None:
    """A request for a model being loaded waits for it (telling its progress), holding no slot: another model's
    requests run meanwhile; past its deadline it is answered a timeout."""

    async def main() -> None:
        engine, source, log = _engine(max_concurrency=1, request_timeout=0.5)
        source.loading["b"] = asyncio.get_running_loop().create_future()
        events: list[ProgressEvent] = []
        waiting = asyncio.create_task(engine.submit(_req("b0", "b"), progress=events.append))
        await asyncio.sleep(0.01)
        assert events and events[0].type == "loading" and events[0].model == "b"
        assert (await engine.submit(_req("a0", "a"))).images == ["a:a0"], "a load held up another model"
        assert engine.active == 0
        source.loading["b"].set_result(None)
        assert (await waiting).images == ["b:b0"]
        source.loading["b"] = asyncio.get_running_loop().create_future()  # never loads
        with pytest.raises(GenerationTimeout):
            await engine.submit(_req("b1", "b"))
        assert log == ["a0", "b0"]
        engine.close()

    asyncio.run(main())


def test_fair_queue_order_and_shedding() -> None:
    """The queue alone: service order by fewest running, then arrival; the longest model sheds its newest."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = FairQueue()
        made = {}
        for name, model in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c")):
            made[name] = loop.create_future()
            queue.push(made[name], model)
        names = {id(f): n for n, f in made.items()}
        order = [names[id(f)] for f in queue.order({"a": 1})]
        assert order == ["b1", "c1", "a1", "a2", "a3"]
        assert names[id(queue.head({}))] == "a1"
        assert names[id(queue.displaced_by("b"))] == "a3"
        assert queue.displaced_by("a") is None
        for name in ("a2", "a3"):
            queue.remove(made[name])
        assert queue.displaced_by("b") is None, "no model holds more than b"
        assert len(queue) == 3 and queue.counts() == {"a": 1, "b": 1, "c": 1}

    asyncio.run(main())
