"""The native API: POST /api/diffusers/inference answers image URLs; GET /images/{filename} serves them."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from api.deps import base_url, ready_engine, require_key
from api.errors import APIError, ErrorResponse
from api.generation import run_generation, save_all, timing_headers, to_generation
from api.schemas import InferenceRequest, InferenceResponse, ResolvedParameters

__all__ = ["router"]

router = APIRouter()

NATIVE_NAMES = {"steps": "num_inference_steps", "n": "num_images_per_prompt"}


@router.post(
    "/api/diffusers/inference",
    response_model=InferenceResponse,
    dependencies=[Depends(require_key)],
    summary="Generate images; answers their URLs",
)
async def inference(body: InferenceRequest, request: Request) -> JSONResponse:
    from utils.image_store import build_image_url

    ready_engine(request)  # 503 while loading, before the limits (which depend on the model) are checked
    generation = to_generation(
        request, body, NATIVE_NAMES, n=body.num_images_per_prompt, height=body.height, width=body.width
    )
    result = await run_generation(request, generation)
    names = await save_all(request.app.state.store, result.images)
    base = base_url(request)
    payload = InferenceResponse(
        response=[build_image_url(base, name) for name in names],
        seed=result.seed,
        parameters=ResolvedParameters.model_validate(
            {**dataclasses.asdict(generation), "num_images_per_prompt": generation.num_images}
        ),
        request_id=generation.request_id,
    )
    return JSONResponse(payload.model_dump(), headers=timing_headers(result))


@router.get(
    "/images/{filename}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG"}, 404: {"model": ErrorResponse}},
    summary="A generated image",
)
async def get_image(filename: str, request: Request) -> FileResponse:
    path = request.app.state.store.lookup(filename)
    if path is None:
        raise APIError(404, "No such image.", "not_found_error", param="filename", code="image_not_found")
    return FileResponse(
        path,
        media_type="image/png",
        headers={"Cache-Control": "public, max-age=86400, immutable", "X-Content-Type-Options": "nosniff"},
    )
