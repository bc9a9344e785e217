"""The OpenAI Images API: POST /v1/images/generations and GET /v1/models."""

from __future__ import annotations

import base64
import re
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.adapters import model_entries
from api.deps import base_url, ready_engine
from api.errors import APIError
from api.generation import encode_all, encoding_of, run_generation, save_all, timing_headers, to_generation
from api.models import use_model
from api.schemas import OpenAIImageRequest, OpenAIImagesResponse, response_format_of
from api.sse import SSE_EVENT_SCHEMA, SSE_MEDIA_TYPE
from api.streaming import stream_generation

if TYPE_CHECKING:
    from engine import GenerationRequest

__all__ = ["OPENAI_NAMES", "openai_answer", "parse_size", "router"]

router = APIRouter()

OPENAI_NAMES = {"height": "size", "width": "size", "steps": "num_inference_steps"}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``'WIDTHxHEIGHT'`` as (width, height); ``None`` or ``'auto'`` as the model's default."""
    if not size or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not match:
        raise APIError(400, "size: use 'WIDTHxHEIGHT', e.g. '1024x1024', or 'auto'", param="size", code="invalid_value")
    return int(match.group(1)), int(match.group(2))  # their range is checked with the configured limits


@router.post(
    "/v1/images/generations",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    summary="OpenAI Images API: generate images",
    responses={200: {"content": {SSE_MEDIA_TYPE: {"schema": SSE_EVENT_SCHEMA}}, "description": "with stream"}},
)
async def openai_generations(body: OpenAIImageRequest, request: Request) -> Response:
    ready_engine(request)  # 503 while loading, before the limits (which depend on the model) are checked
    await use_model(request, body.model)
    width, height = parse_size(body.size)
    generation = to_generation(request, body, OPENAI_NAMES, n=body.n, height=height, width=width)
    return await openai_answer(request, generation, body)


async def openai_answer(
    request: Request, generation: GenerationRequest, body: Any, events: tuple[str, str] | None = None
) -> Response:
    """Run ``generation`` and answer as OpenAI's Images API does (generations, edits, variations): the images as
    URLs or base64 per ``body.response_format`` (by default base64 for ``gpt-image-*`` models, as OpenAI answers
    them, else URLs), or streamed (``body.stream``, with ``events``' names)."""
    from utils.image_store import build_image_url

    encoding = encoding_of(body)
    if getattr(body, "stream", False):
        names = {} if events is None else {"names": events}
        return await stream_generation(request, generation, body.partial_images or 0, encoding, **names)
    result = await run_generation(request, generation)
    if response_format_of(body) == "b64_json":
        data = [{"b64_json": base64.b64encode(e).decode()} for e in await encode_all(result.images, encoding)]
    else:
        base = base_url(request)
        names_saved = await save_all(request.app.state.store, result.images, encoding)
        data = [{"url": build_image_url(base, name)} for name in names_saved]
    answer = {
        "created": int(time.time()),
        "data": data,
        "output_format": encoding.format,
        "size": f"{generation.width}x{generation.height}",
    }
    if generation.model:  # several models: which one served
        answer["model"] = generation.model
    if generation.loras:
        answer["loras"] = [{"name": name, "scale": scale} for name, scale in generation.loras]
    return JSONResponse(answer, headers=timing_headers(result))


@router.get("/v1/models", summary="OpenAI-style model list: every model, each followed by its LoRA adapters")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": model_entries(request, int(request.app.state.started_at))}
