"""Jobs on the native API: POST /api/jobs, GET /api/jobs/{id}, GET /api/jobs/{id}/events (SSE), DELETE /api/jobs/{id}.

The job store and runner are ``api.jobs``; a job's result is the synchronous API's answer (``native_answer``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import base_url, ready_engine
from api.edits import native_generation
from api.errors import APIError, ErrorResponse
from api.generation import encoding_of
from api.jobs import Job, JobStore, Subscriber
from api.routes.native import NATIVE_NAMES, native_answer
from api.schemas import JobCreated, JobRequest, JobState
from api.sse import SSE_EVENT_SCHEMA, SSE_HEADERS, SSE_MEDIA_TYPE, comment, sse_event

__all__ = ["KEEP_ALIVE_S", "router"]

router = APIRouter()

KEEP_ALIVE_S = 15.0  # a comment line on an idle event stream, so proxies and clients do not time it out
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No such job, or it expired"}}


def _jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def _job(request: Request, job_id: str) -> Job:
    job = _jobs(request).get(job_id)
    if job is None:
        raise APIError(404, "No such job (or it expired).", "not_found_error", param="id", code="job_not_found")
    return job


@router.post(
    "/api/jobs",
    status_code=202,
    response_model=JobCreated,
    summary="Start a generation as a job; answers its id and URLs at once",
)
async def create_job(body: JobRequest, request: Request) -> JSONResponse:
    engine = ready_engine(request)  # 503 while loading, before the limits (which depend on the model) are checked
    generation = await native_generation(request, body, NATIVE_NAMES, body.num_images_per_prompt)
    generation.preview_every = body.preview_every
    settings = request.app.state.settings
    # The result's image URLs are built for the client that created the job, as the synchronous API builds them.
    finisher = functools.partial(native_answer, request.app.state.store, base_url(request), encoding=encoding_of(body))
    job = await _jobs(request).start(generation, engine, finisher, settings.request_timeout)
    status_url = f"{base_url(request)}/api/jobs/{job.id}"
    created = {"id": job.id, "status": "queued", "status_url": status_url, "events_url": f"{status_url}/events"}
    return JSONResponse(created, status_code=202, headers={"Location": status_url})


@router.get("/api/jobs/{job_id}", response_model=JobState, responses=_NOT_FOUND, summary="A job's state and result")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return _job(request, job_id).to_dict()


@router.delete(
    "/api/jobs/{job_id}",
    response_model=JobState,
    responses=_NOT_FOUND,
    summary="Cancel a job: a queued one never runs, a running one stops at its next step",
)
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    job = _job(request, job_id)
    _jobs(request).cancel(job)
    if job.task is not None and not job.task.done():
        # The engine gives up on a cancelled request at once (its thread stops at the next step, in the background),
        # so the job's own task ends within moments; then the answer shows the final status.
        await asyncio.wait({job.task}, timeout=10)
    return job.to_dict()


@router.get(
    "/api/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {SSE_MEDIA_TYPE: {"schema": SSE_EVENT_SCHEMA}}, "description": "The job's events"},
        **_NOT_FOUND,
    },
    summary="A job's events (Server-Sent Events): its current state, then live events until done",
)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    job = _job(request, job_id)
    return StreamingResponse(_stream(job, job.subscribe()), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


async def _stream(job: Job, subscriber: Subscriber) -> AsyncIterator[bytes]:
    try:
        while True:
            event = await subscriber.get(KEEP_ALIVE_S)
            if event is None:
                yield comment("keep-alive")
                continue
            name, data = event
            yield sse_event(data, event=name)
            if name == "done":
                return
    finally:
        job.subscribers.discard(subscriber)
