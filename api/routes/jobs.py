"""Jobs on the native API: POST /api/jobs, GET /api/jobs/{id}, GET /api/jobs/{id}/events (SSE), DELETE /api/jobs/{id}.

The job service is ``jobs`` (its stores: memory, the default, or SQLite and Redis: ``--job-store``); a job's result
is the synchronous API's answer (``native_answer``), kept with its images' paths (``/images/NAME``): their URLs are
built when the job is read, for the client reading it (its Host, or ``--public-url``), so whichever server made or
ran the job, the one answering hands out URLs that work on it. The service's refusals (a full, unreachable or
refusing store) are answered by ``api.errors``' handlers.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import base_url, ready_engine
from api.edits import native_generation
from api.errors import APIError, ErrorResponse
from api.generation import encoding_of
from api.routes.native import NATIVE_NAMES, native_answer
from api.schemas import JobCreated, JobRequest, JobState
from api.sse import SSE_EVENT_SCHEMA, SSE_HEADERS, SSE_MEDIA_TYPE, comment, sse_event
from jobs import KEEP_ALIVE_S

__all__ = ["KEEP_ALIVE_S", "router"]

router = APIRouter()

_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No such job, or it expired"}}


def _jobs(request: Request) -> Any:
    """The job store: ``jobs.memory.JobStore`` (memory) or ``jobs.durable.DurableJobs`` (SQLite, Redis)."""
    return request.app.state.jobs


def _not_found() -> APIError:
    return APIError(404, "No such job (or it expired).", "not_found_error", param="id", code="job_not_found")


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
    # The result keeps its images' paths (no base URL): their URLs are built for each reader (_for_client). A durable
    # store keeps the context, so the job can be run again elsewhere with the same answer.
    encoding = encoding_of(body)
    finisher = functools.partial(native_answer, request.app.state.store, "", encoding=encoding)
    context = {"format": encoding.format, "compression": encoding.compression}
    job = await _jobs(request).start(generation, engine, finisher, context=context)
    status_url = f"{base_url(request)}/api/jobs/{job.id}"
    created = {"id": job.id, "status": "queued", "status_url": status_url, "events_url": f"{status_url}/events"}
    return JSONResponse(created, status_code=202, headers={"Location": status_url})


@router.get("/api/jobs/{job_id}", response_model=JobState, responses=_NOT_FOUND, summary="A job's state and result")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    state = await _jobs(request).describe(job_id)
    if state is None:
        raise _not_found()
    return _for_client(state, base_url(request))


@router.delete(
    "/api/jobs/{job_id}",
    response_model=JobState,
    responses=_NOT_FOUND,
    summary="Cancel a job: a queued one never runs, a running one stops at its next step",
)
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    state = await _jobs(request).stop(job_id)
    if state is None:
        raise _not_found()
    return _for_client(state, base_url(request))


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
    events = await _jobs(request).follow(job_id)
    if events is None:
        raise _not_found()
    return StreamingResponse(_stream(events, base_url(request)), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


def _for_client(state: dict[str, Any], base: str) -> dict[str, Any]:
    """``state`` with its result's image paths (``/images/NAME``) made URLs under ``base``, the reading client's.
    URLs already absolute (a job stored by an older version) are left as they are."""
    result = state.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("response"), list):
        return state
    urls = [base + url if isinstance(url, str) and url.startswith("/") else url for url in result["response"]]
    return {**state, "result": {**result, "response": urls}}  # a copy: the job's own state is every reader's


async def _stream(events: AsyncIterator[tuple[str, dict[str, Any]] | None], base: str) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            if event is None:
                yield comment("keep-alive")
                continue
            name, data = event
            yield sse_event(_for_client(data, base) if name == "done" else data, event=name)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
