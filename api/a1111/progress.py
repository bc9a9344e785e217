"""What ``GET /sdapi/v1/progress``, ``POST /sdapi/v1/interrupt`` and ``POST /sdapi/v1/skip`` read and act on.

A1111 runs one job at a time, so its progress, interrupt and skip need no argument. Here many requests run at once;
each txt2img or img2img request in flight is a ``Task`` on the app's ``ProgressBoard``, fed by the engine's progress
events (the ones jobs and streamed answers are built on), and the three routes act on one task:

- the one named by ``?id_task=`` (its ``force_task_id``, or else its ``X-Request-ID``), so that a client among
  many follows its own request;
- otherwise the oldest running one (the oldest waiting one when none runs yet): with one client, its own.

A task's images run as generations of their own (``api.a1111.run``). ``progress`` is the task's denoising steps
done over all of its steps; ``state.sampling_step`` / ``sampling_steps`` those of its first unfinished image,
``job_no`` its images finished; ``job_count`` the generations in flight on the whole server (running and queued,
every API): what a client polls to know the server is busy. ``interrupt`` stops every image of the task (a running
one at its next step, a waiting one before it starts), ``skip`` the ones running now (the waiting ones go on): the
request then answers the images that were finished.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from api.streaming import encode_for_stream

__all__ = ["ProgressBoard", "StopEvent", "Task", "idle_answer"]


class StopEvent(asyncio.Event):
    """One image's ``gone`` event: set when its client leaves, or by interrupt and skip, which also mark it
    ``cancelled`` (so the engine counts it as cancelled, not as a client that left)."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.set()


class Task:
    """One txt2img or img2img request in flight: its images' steps, their stop events, its latest preview."""

    def __init__(self, task_id: str, steps: list[int], size: tuple[int, int]) -> None:
        self.id = task_id
        self.created = time.time()
        self.totals = steps  # each image's denoising steps
        self.done = [0] * len(steps)
        self.started = [False] * len(steps)
        self.finished = [False] * len(steps)
        self.stops = [StopEvent() for _ in steps]
        self.started_at: float | None = None  # monotonic: the first image left the queue
        self.interrupted = self.skipped = False
        self.size = size
        self.preview: Any = None  # the latest preview (PIL), and its encoding once asked for
        self.encoded: str | None = None

    def listener(self, index: int) -> Any:
        """The engine's progress callback for image ``index`` (called on the event loop)."""

        def progress(event: Any) -> None:
            if event.type == "started":
                self.started[index] = True
                self.started_at = self.started_at or time.monotonic()
            elif event.type == "step":
                self.started[index] = True
                self.done[index] = event.step or 0
                if event.previews:
                    self.preview, self.encoded = event.previews[0], None

        return progress

    @property
    def running(self) -> bool:
        return any(s and not f for s, f in zip(self.started, self.finished, strict=True))

    def interrupt(self) -> None:
        self.interrupted = True
        for stop, finished in zip(self.stops, self.finished, strict=True):
            if not finished:
                stop.cancel()

    def skip(self) -> None:
        self.skipped = True
        for stop, started, finished in zip(self.stops, self.started, self.finished, strict=True):
            if started and not finished:
                stop.cancel()

    def state(self, in_flight: int) -> dict[str, Any]:
        """A1111's ``state`` object for this task."""
        current = next((i for i, f in enumerate(self.finished) if not f and self.started[i]), None)
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.id,
            "job_count": in_flight,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(self.created)),
            "job_no": sum(self.finished),
            "sampling_step": 0 if current is None else self.done[current],
            "sampling_steps": 0 if current is None else self.totals[current],
        }

    def fraction(self) -> tuple[float, float]:
        """(progress 0..1, seconds left estimated from the step rate so far)."""
        total = sum(self.totals)
        progress = min(1.0, sum(self.done) / total) if total else 0.0
        if progress <= 0 or self.started_at is None:
            return progress, 0.0
        elapsed = time.monotonic() - self.started_at
        return progress, max(0.0, elapsed / progress - elapsed)


class ProgressBoard:
    """The A1111 requests in flight on one app, oldest first. Touched only on the event loop: no lock."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def add(self, task: Task) -> None:
        self.tasks.append(task)

    def remove(self, task: Task) -> None:
        if task in self.tasks:
            self.tasks.remove(task)

    def pick(self, id_task: str | None) -> Task | None:
        """The task the routes act on (see the module's notes); None when there is none."""
        if id_task:
            return next((task for task in self.tasks if task.id == id_task), None)
        return next((task for task in self.tasks if task.running), self.tasks[0] if self.tasks else None)

    async def answer(self, task: Task, in_flight: int, with_image: bool) -> dict[str, Any]:
        """``GET /sdapi/v1/progress``'s answer for ``task``; its preview encoded in a thread (once per preview)."""
        progress, eta = task.fraction()
        image = None
        if with_image and task.preview is not None:
            image = task.encoded
            if image is None:
                preview = task.preview
                image = await asyncio.to_thread(encode_for_stream, preview, task.size)
                if task.preview is preview:  # a newer preview may have come meanwhile: keep the newest's
                    task.encoded = image
        return {"progress": progress, "eta_relative": eta, "state": task.state(in_flight), "current_image": image}


def idle_answer(in_flight: int) -> dict[str, Any]:
    """The answer when no A1111 request is in flight (or none has the id asked for)."""
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": in_flight,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None}
