"""Following a durable job's events: live from the run on this server, else from the store (another server runs it,
or nobody does yet), with the memory store's rules: a replay of where the job is, then live events until ``done``,
through a bounded ``Subscriber`` (a slow reader loses intermediate ``queued``/``step``/``preview`` events, never
``started`` or ``done``, and never holds the job or the store up).

The store's events: Redis has a stream per job (``backend.read``), written by the server running the job in the same
atomic step as its record; a store without one (SQLite) is polled every ``POLL_S`` and its changes are told as events
(``records.diff_events``). A quiet stream is checked against the record, so a job ended by the reaper (its server
died) still ends its followers' streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from jobs.errors import StoreUnavailable
from jobs.job import KEEP_ALIVE_S, Job, Subscriber
from jobs.records import FINAL, diff_events, replay, state_of

__all__ = ["POLL_S", "follow_local", "follow_store"]

POLL_S = 0.2  # a follower of a store without an event stream (SQLite) reads the record this often
RETRY_S = 1.0  # a follower whose store is unreachable tries again this often (and gets keep-alives meanwhile)

Event = tuple[str, dict[str, Any]]


async def follow_local(backend: Any, job: Job, subscriber: Subscriber) -> AsyncIterator[Event | None]:
    """The run's own events; if the run hands the job back (``moved``), the store's from there on."""
    try:
        while True:
            event = await subscriber.get(KEEP_ALIVE_S)
            if event is not None and event[0] == "moved":
                break
            yield event
            if event is not None and event[0] == "done":
                return
    finally:
        job.subscribers.discard(subscriber)
    async for event in follow_store(backend, job.id):
        yield event


async def follow_store(backend: Any, job_id: str) -> AsyncIterator[Event | None]:
    """The record replayed, then the store's events, through a bounded ``Subscriber`` fed by a pump task."""
    subscriber = Subscriber()
    pump = asyncio.create_task(_pump(backend, job_id, subscriber), name=f"follow-{job_id[:8]}")
    try:
        while True:
            event = await subscriber.get(KEEP_ALIVE_S)
            if event is None and pump.done():
                return  # the job went (evicted) without a last word
            yield event
            if event is not None and event[0] == "done":
                return
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)


async def _pump(backend: Any, job_id: str, subscriber: Subscriber) -> None:
    while True:
        try:
            record, cursor = await backend.snapshot(job_id)
            break
        except StoreUnavailable:
            await asyncio.sleep(RETRY_S)
    if record is None:
        return
    for name, data in replay(record):
        subscriber.put(name, data)
    while record["status"] not in FINAL:
        try:
            new, events, cursor = await _next(backend, job_id, record, cursor)
        except StoreUnavailable:
            await asyncio.sleep(RETRY_S)
            continue
        if new is None:
            return
        for name, data in events:
            subscriber.put(name, data)
            if name == "done":
                return
        record = new


async def _next(backend: Any, job_id: str, record: dict[str, Any], cursor: Any) -> tuple[Any, list[Event], Any]:
    """The record as it is now (None: gone), the events since ``record``, and the stream's new cursor."""
    if cursor is None:  # no event stream: poll the record
        await asyncio.sleep(POLL_S)
        new = await backend.load(job_id)
        return new, ([] if new is None else diff_events(record, new)), None
    events, cursor = await backend.read(job_id, cursor, KEEP_ALIVE_S / 3)
    if events:
        return record, events, cursor
    new = await backend.load(job_id)  # quiet: a server that died says nothing, but the reaper's end is recorded
    return new, ([("done", state_of(new))] if new is not None and new["status"] in FINAL else []), cursor
