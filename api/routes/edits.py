"""OpenAI's image edits and variations: POST /v1/images/edits and POST /v1/images/variations.

The bodies are read by ``api.edit_forms`` (multipart, or JSON for edits), the images by ``api.images_in`` (checked,
decoded in a thread; OpenAI's mask convention converted), the generation made by ``api.edits``, and the answer is
the generations' own (``api.routes.openai.openai_answer``), streamed with OpenAI's ``image_edit.*`` event names.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import ready_engine
from api.edit_forms import EditForm, OpenAIEditRequest, OpenAIVariationRequest, read_edit, read_variation
from api.edits import edit_generation
from api.images_in import read_inputs
from api.routes.openai import OPENAI_NAMES, openai_answer, parse_size
from api.schemas import OpenAIImagesResponse
from api.sse import SSE_EVENT_SCHEMA, SSE_MEDIA_TYPE
from api.streaming import EDIT_EVENTS

__all__ = ["PATHS", "router"]

router = APIRouter()

EDITS, VARIATIONS = "/v1/images/edits", "/v1/images/variations"
PATHS = (EDITS, VARIATIONS)
EDIT_NAMES = {**OPENAI_NAMES, "mask": "mask"}
_FILE = {"type": "string", "format": "binary"}


def _form_schema(model: type[Any], files: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """The OpenAPI schema of a multipart body: ``model``'s fields as text parts, plus the ``files``."""
    schema = model.model_json_schema()
    return {
        "type": "object",
        "properties": {**files, **schema["properties"]},
        "required": required,
    }


def _edit_body() -> dict[str, Any]:
    reference = {"type": "object", "properties": {"image_url": {"type": "string"}}, "required": ["image_url"]}
    files = {
        "image": {**_FILE, "description": "the image to edit (PNG, JPEG or WebP); or image[] with one file"},
        "image[]": {"type": "array", "items": _FILE, "maxItems": 1},
        "mask": {**_FILE, "description": "same size as the image; its fully transparent pixels are edited"},
    }
    json_schema = _form_schema(OpenAIEditRequest, {}, ["images", "prompt"])
    json_schema["properties"] = {
        "images": {"type": "array", "items": reference, "minItems": 1, "maxItems": 1},
        "mask": reference,
        **json_schema["properties"],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": _form_schema(OpenAIEditRequest, files, ["prompt"])},
                "application/json": {"schema": json_schema},
            },
        }
    }


def _variation_body() -> dict[str, Any]:
    files = {"image": {**_FILE, "description": "the image to vary (PNG, JPEG or WebP)"}}
    schema = _form_schema(OpenAIVariationRequest, files, ["image"])
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_STREAM = {200: {"content": {SSE_MEDIA_TYPE: {"schema": SSE_EVENT_SCHEMA}}, "description": "with stream"}}


@router.post(
    EDITS,
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    summary="OpenAI Images API: edit an image (image-to-image; with a mask, inpainting)",
    openapi_extra=_edit_body(),
    responses={**_STREAM, 415: {"description": "neither multipart/form-data nor application/json"}},
)
async def openai_edits(request: Request) -> Response:
    ready_engine(request)  # 503 while loading, before the body is read
    return await _answer(request, await read_edit(request), blank_prompt=False)


@router.post(
    VARIATIONS,
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    summary="OpenAI Images API: variations of an image (image-to-image from the image alone)",
    openapi_extra=_variation_body(),
    responses={415: {"description": "not multipart/form-data"}},
)
async def openai_variations(request: Request) -> Response:
    ready_engine(request)
    return await _answer(request, await read_variation(request), blank_prompt=True)


async def _answer(request: Request, form: EditForm, blank_prompt: bool) -> Response:
    body = form.fields
    width, height = parse_size(body.size)
    inputs = await read_inputs(form.image, form.mask, "openai", request.app.state.settings.max_input_side)
    generation = await edit_generation(
        request,
        body,
        EDIT_NAMES,
        inputs,
        n=body.n,
        width=width,
        height=height,
        strength=body.strength,
        mask_blur=getattr(body, "mask_blur", None),  # edits only: a variation has no mask
        blank_prompt=blank_prompt,
    )
    return await openai_answer(request, generation, body, EDIT_EVENTS)
