"""The native API: POST /api/diffusers/inference answers image URLs; GET /images/{filename} serves them."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any, BinaryIO

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from api.deps import base_url, ready_engine
from api.edits import native_generation
from api.errors import APIError, ErrorResponse
from api.generation import encoding_of, run_generation, save_all, timing_headers
from api.schemas import InferenceRequest, InferenceResponse, ResolvedParameters

if TYPE_CHECKING:
    from engine import GenerationRequest, GenerationResult
    from utils.image_store import Encoding

__all__ = ["NATIVE_NAMES", "native_answer", "router"]

router = APIRouter()

NATIVE_NAMES = {"steps": "num_inference_steps", "n": "num_images_per_prompt"}
# utils.image_store.MEDIA_TYPES' values, for the OpenAPI document (utils is not imported here: it loads torch).
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp")


@router.post(
    "/api/diffusers/inference",
    response_model=InferenceResponse,
    summary="Generate images; answers their URLs",
)
async def inference(body: InferenceRequest, request: Request) -> JSONResponse:
    ready_engine(request)  # 503 while loading, before the limits (which depend on the model) are checked
    generation = await native_generation(request, body, NATIVE_NAMES, body.num_images_per_prompt)
    encoding = encoding_of(body)
    result = await run_generation(request, generation)
    payload = await native_answer(request.app.state.store, base_url(request), generation, result, encoding)
    return JSONResponse(payload, headers=timing_headers(result))


async def native_answer(
    store: Any, base: str, generation: GenerationRequest, result: GenerationResult, encoding: Encoding
) -> dict[str, Any]:
    """Store the images (encoded as ``encoding``) and build this API's answer: their URLs under ``base``, the seed and
    the parameters used. A job's result has ``base`` "": its images' paths, made URLs for each reader
    (``api.routes.jobs``)."""
    from utils.image_store import build_image_url

    names = await save_all(store, result.images, encoding)
    # Field by field, not dataclasses.asdict: that would deep-copy an edit's input images to drop them.
    fields = {f.name: getattr(generation, f.name) for f in dataclasses.fields(generation)}
    resolved = {
        **{name: value for name, value in fields.items() if name not in ("image", "mask_image")},
        "num_images_per_prompt": generation.num_images,
        "output_format": encoding.format,
        "output_compression": encoding.compression,
        "loras": [{"name": name, "scale": scale} for name, scale in generation.loras],
        "mask_blur": generation.mask_blur if generation.mask_image is not None else None,
    }
    resolved = {name: value for name, value in resolved.items() if name in ResolvedParameters.model_fields}
    if generation.model:  # several models: which one served (a server of one model answers as it always did)
        resolved["model"] = generation.model
    payload = InferenceResponse(
        response=[build_image_url(base, name) for name in names],
        seed=result.seed,
        parameters=ResolvedParameters.model_validate(resolved),
        request_id=generation.request_id,
    )
    return payload.model_dump()


@router.get(
    "/images/{filename}",
    response_class=Response,
    responses={
        200: {"content": {t: {} for t in IMAGE_MEDIA_TYPES}, "description": "The image, in the format it was made"},
        404: {"model": ErrorResponse},
    },
    summary="A generated image",
)
async def get_image(filename: str, request: Request) -> Response:
    from utils.image_store import media_type_of

    # Opened before answering: retention may delete the name while we send, the open file stays whole.
    opened = await asyncio.to_thread(request.app.state.store.open_image, filename)
    if opened is None:
        raise APIError(404, "No such image.", "not_found_error", param="filename", code="image_not_found")
    return OpenFileResponse(*opened, media_type=media_type_of(filename))


class OpenFileResponse(Response):
    """Streams an already open file (closed when done), with the size taken from it when it was opened."""

    CHUNK = 256 * 1024

    def __init__(self, handle: BinaryIO, size: int, media_type: str) -> None:
        super().__init__(
            headers={
                "Content-Length": str(size),
                "Cache-Control": "public, max-age=86400, immutable",
                "X-Content-Type-Options": "nosniff",
            },
            media_type=media_type,
        )
        self.handle, self.size = handle, size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            remaining = self.size
            while remaining > 0:
                chunk = await asyncio.to_thread(self.handle.read, min(self.CHUNK, remaining))
                if not chunk:  # cannot happen to a file we hold open (it only grows by rename, never in place)
                    break
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
            if remaining:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.handle.close()
