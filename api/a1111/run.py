"""An A1111 request's generations run together on the engine, and its answer: ``images``, ``parameters``, ``info``.

Each image is a generation of its own (``api.a1111.mapping``), submitted through ``run_generation`` like every other
API's (admission, deadlines, the client leaving, drain, metrics), all at once, followed by a ``Task`` on the app's
progress board while they run. The first failure (a full queue, a deadline ...) stops the others and is the
answer, in the error envelope. Images stopped by ``interrupt`` or ``skip`` are left out of the answer, which holds
the images that were finished (none, when all were stopped) and says ``"interrupted": true`` in its ``info``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from api.a1111.infotext import info_of
from api.a1111.options import state_of
from api.a1111.progress import Task
from api.errors import APIError
from api.generation import encode_all, run_generation, steps_run, timing_headers

__all__ = ["answer"]

# Input images are not echoed back in ``parameters`` (A1111 leaves init_images out too).
NOT_ECHOED = frozenset({"init_images", "mask", "latent_mask"})


def _stopped(run: asyncio.Task[Any], task: Task, index: int) -> bool:
    """Whether image ``index`` ended because interrupt, skip or another image's failure stopped it."""
    exc = run.exception()
    return isinstance(exc, APIError) and exc.status == 499 and task.stops[index].cancelled


async def _run_all(request: Request, generations: list[Any], task: Task) -> list[Any]:
    """Every generation's result (None: stopped), or the first failure raised once all have ended."""

    async def one(index: int) -> Any:
        try:
            return await run_generation(request, generations[index], task.listener(index), task.stops[index])
        finally:
            task.finished[index] = True

    runs = [asyncio.create_task(one(i)) for i in range(len(generations))]
    try:
        await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
        if any(r.done() and r.exception() is not None and not _stopped(r, task, i) for i, r in enumerate(runs)):
            for stop in task.stops:  # one failed: the answer is its error, the others' work is not wanted
                stop.cancel()
        await asyncio.wait(runs)
    except asyncio.CancelledError:
        for stop in task.stops:
            stop.cancel()
        raise
    for i, run in enumerate(runs):
        if run.exception() is not None and not _stopped(run, task, i):
            raise run.exception()  # type: ignore[misc]
    return [None if run.exception() is not None else run.result() for run in runs]


async def answer(request: Request, body: Any, plan: Any) -> JSONResponse:
    """Run ``plan`` and answer as A1111 does (see the module's notes)."""
    first = plan.generations[0]
    task = Task(plan.task_id, [steps_run(g) for g in plan.generations], (first.width, first.height))
    board = state_of(request).board
    board.add(task)
    try:
        results = await _run_all(request, plan.generations, task)
    finally:
        board.remove(task)
    kept = [i for i, result in enumerate(results) if result is not None]
    images = [results[i].images[0] for i in kept]
    encoded = await encode_all(images, plan.encoding) if body.send_images else []
    info = info_of(plan, body, kept, stopped=len(kept) < len(results))
    payload = {
        "images": [base64.b64encode(data).decode() for data in encoded],
        "parameters": body.model_dump(mode="json", exclude=NOT_ECHOED),
        "info": json.dumps(info, ensure_ascii=False),
    }
    headers = timing_headers(results[kept[0]]) if kept else {"X-Seed": str(first.seed)}
    return JSONResponse(payload, headers=headers)
