"""The bodies of OpenAI's ``POST /v1/images/edits`` and ``/v1/images/variations``: their fields, and how a
multipart form or a JSON body becomes them.

- **Multipart**, as the ``openai`` client sends it: the image as ``image`` (one file) or ``image[]`` (the client's
  name for a list), the mask as ``mask``, every other field a text part (``extra_body`` too: the client sends its
  keys as ordinary form fields). A text part where a file is expected is read as base64 or a ``data:`` URL.
- **JSON** (edits only), OpenAI's form for images by reference: ``{"images": [{"image_url": ...}], "mask":
  {"image_url": ...}, ...}``. Only ``data:`` URLs (or plain base64) are read; a remote URL is refused and never
  fetched (``api.images_in.decode_string``); a ``file_id`` is refused (there is no Files API here).

One image per edit: a second one is refused 400 (``too_many_images``), not silently dropped. Fields that cannot
apply to this model are refused with a 400 naming them; fields that change nothing here are accepted and ignored
(docs/api/edits.md has the list).

A multipart form is bounded as it is parsed (Starlette's parser): at most ``MAX_FILES`` file parts,
``MAX_FIELDS`` text parts, and ``MAX_TEXT_PART`` bytes in one text part (files have only the body's limit,
--max-upload-bytes). Past one of them the parser stops and says so in its own words; each is answered 400 in the
envelope with a code of ours (``too_many_files``, ``too_many_fields``, ``part_too_large``; ``invalid_multipart``
for a body that is not valid multipart) and a message that gives the limit.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.errors import APIError
from api.images_in import decode_string
from api.schemas import (
    LORAS_DESCRIPTION,
    MASK_BLUR_DESCRIPTION,
    OPENAI_MAX_N,
    OPENAI_MAX_PARTIAL_IMAGES,
    RESPONSE_FORMAT_DESCRIPTION,
    Guidance,
    Loras,
    MaskBlur,
    OutputOptions,
    Prompt,
    Seed,
    Steps,
    Strength,
)

__all__ = ["EditForm", "OpenAIEditRequest", "OpenAIVariationRequest", "read_edit", "read_variation"]

Short = Annotated[str, Field(max_length=256)]
IMAGE_FIELDS = ("image", "image[]")
# Fields of OpenAI's edit that this model cannot do (an overlay, SVG or GIF output): refused, whatever their value.
REFUSED = {
    "markup": "guiding overlays are not supported here",
    "svg": "SVG output is not supported here",
    "frame_count": "GIF output is not supported here",
    "frame_duration_ms": "GIF output is not supported here",
}


class _ImageFields(OutputOptions):
    """What edits and variations share."""

    model_config = ConfigDict(extra="ignore")

    model: Short | None = Field(
        None, description="the model to run (GET /v1/models); an unknown name: the default model"
    )
    n: Annotated[int, Field(ge=1, le=OPENAI_MAX_N)] = 1
    size: Annotated[str, Field(max_length=16)] | None = Field(
        None, description="'WIDTHxHEIGHT' or 'auto' (default): the image's size, fitted to the limits"
    )
    response_format: Literal["url", "b64_json"] | None = Field(None, description=RESPONSE_FORMAT_DESCRIPTION)
    user: Short | None = Field(None, description="accepted and ignored")
    # Extensions, as on generations.
    seed: Seed | None = None
    negative_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    loras: Loras = Field(None, description=LORAS_DESCRIPTION + "; multipart: loras[][name], loras[][scale] fields")


class OpenAIVariationRequest(_ImageFields):
    """The fields of POST /v1/images/variations (multipart), beside the ``image`` file."""

    strength: Strength | None = Field(None, description="how far from the image a variation goes (default 0.6)")

    @property
    def prompt(self) -> str:
        """A variation is made from the image alone: an empty prompt."""
        return ""


class OpenAIEditRequest(_ImageFields):
    """The fields of POST /v1/images/edits, beside the image and the mask."""

    prompt: Prompt
    strength: Strength | None = Field(
        None, description="how much of the schedule runs, (0, 1] (default: 0.6 without a mask, 1 with one)"
    )
    mask_blur: MaskBlur | None = Field(None, description=MASK_BLUR_DESCRIPTION)
    quality: Annotated[str, Field(max_length=32)] | None = Field(None, description="accepted and ignored")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto or opaque; transparent is refused (SD3 images have no alpha channel)"
    )
    input_fidelity: Literal["low", "high"] | None = Field(
        None, description="low (accepted); high is refused: a lower strength keeps more of the image"
    )
    complexity: Annotated[str, Field(max_length=32)] | None = Field(None, description="accepted and ignored")
    safety_identifier: Short | None = Field(None, description="accepted and ignored")
    stream: bool | None = Field(False, description="answer Server-Sent Events (image_edit.* events)")
    partial_images: Annotated[int, Field(ge=0, le=OPENAI_MAX_PARTIAL_IMAGES)] | None = None


@dataclass
class EditForm:
    """A parsed edit or variation: its fields, the image's bytes and the mask's (None: no mask)."""

    fields: Any
    image: bytes
    mask: bytes | None = None


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _validated(model: type[BaseModel], data: dict[str, Any], strict: bool) -> Any:
    for name, why in REFUSED.items():
        if any(key == name or key.startswith(f"{name}[") for key in data):
            raise _bad(name, why, "unsupported_field")
    try:
        fields = model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    if getattr(fields, "background", None) == "transparent":
        raise _bad("background", "'transparent' is not supported: SD3 images have no alpha channel; use 'opaque'")
    if getattr(fields, "input_fidelity", None) == "high":
        raise _bad("input_fidelity", "'high' is not supported; a lower strength keeps more of the image")
    return fields


async def _part_bytes(value: UploadFile | str, param: str) -> bytes:
    if isinstance(value, str):
        return decode_string(value, param)
    return await value.read()


MAX_FILES = 8  # file parts: room for a second image or mask, refused by name (too_many_images), not by count
MAX_FIELDS = 200  # text parts: every field of an edit, with loras[][name] / loras[][scale] pairs, is far fewer
MAX_TEXT_PART = 1024 * 1024  # bytes of one text part (Starlette's default): a prompt, or a small base64 image
# Starlette's MultiPartException texts (what it says begins with these) -> our code and message.
_MULTIPART_LIMITS = {
    "Too many files": (
        "too_many_files",
        f"The form has more than {MAX_FILES} files (the limit); send one image (image or image[]) and at most one "
        "mask.",
    ),
    "Too many fields": (
        "too_many_fields",
        f"The form has more than {MAX_FIELDS} text fields (the limit); send only the fields of the request.",
    ),
    "Part exceeded maximum size": (
        "part_too_large",
        f"A text field of the form is larger than {MAX_TEXT_PART // 1024} KiB (the limit for one text field); "
        "send images as file parts (with a filename), not as text.",
    ),
}


def _multipart_error(exc: MultiPartException) -> APIError:
    """The envelope's answer to a form the parser refused: our code and the limit for the three limits."""
    for start, (code, message) in _MULTIPART_LIMITS.items():
        if exc.message.startswith(start):
            return APIError(400, message, code=code)
    # The parser's other refusals are fixed sentences of its own (no client input in them): kept, bounded.
    return APIError(400, f"The multipart body could not be read: {exc.message[:100]}", code="invalid_multipart")


@contextlib.asynccontextmanager
async def _parsed_form(request: Request) -> AsyncIterator[FormData]:
    """The request's multipart form, parsed within our limits (refusals answered by ``_multipart_error``), its
    uploads' temporary files closed after use. The parser is called here rather than through ``request.form()``,
    which turns its refusals into a plain HTTPException (no code, Starlette's words)."""
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            parser = MultiPartParser(
                request.headers, stream, max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_TEXT_PART
            )
            form = await parser.parse()
    except MultiPartException as exc:
        raise _multipart_error(exc) from None
    try:
        yield form
    finally:
        await form.close()


async def _from_form(request: Request, model: type[BaseModel], mask_allowed: bool) -> EditForm:
    async with _parsed_form(request) as form:
        items = form.multi_items()
        images = [value for key, value in items if key in IMAGE_FIELDS]
        masks = [value for key, value in items if key == "mask"]
        if not images:
            raise _bad("image", "this field is required (a file upload)", "missing")
        if len(images) > 1:
            raise _bad("image", f"one image per request is supported here, not {len(images)}", "too_many_images")
        if masks and not mask_allowed:
            raise _bad("mask", "a variation takes no mask; use /v1/images/edits")
        if len(masks) > 1:
            raise _bad("mask", "send one mask")
        files = (*IMAGE_FIELDS, "mask")
        data = {key: value for key, value in items if key not in files and isinstance(value, str)}
        data = _with_loras(data, items)
        uploads = [key for key, value in items if key not in files and not isinstance(value, str)]
        if uploads:
            raise _bad(uploads[0][:64], "a file is not expected here")
        fields = _validated(model, data, strict=False)
        image = await _part_bytes(images[0], "image")
        mask = await _part_bytes(masks[0], "mask") if masks else None
    return EditForm(fields=fields, image=image, mask=mask)


_LORA_FIELD = re.compile(r"loras\[\d*\]\[(name|scale)\]")


def _with_loras(data: dict[str, Any], items: list[tuple[str, Any]]) -> dict[str, Any]:
    """``loras`` from a form: the ``openai`` client sends ``extra_body={"loras": [{"name": ..., "scale": ...}]}``
    as ``loras[][name]`` / ``loras[][scale]`` fields, in order (a ``loras`` field holding JSON works too)."""
    entries: list[dict[str, Any]] = []
    for key, value in items:
        match = _LORA_FIELD.fullmatch(key)
        if match is None or not isinstance(value, str):
            continue
        if not entries or match.group(1) in entries[-1]:  # a field the current entry has: the next entry starts
            entries.append({})
        entries[-1][match.group(1)] = value
    data = {key: value for key, value in data.items() if not _LORA_FIELD.fullmatch(key)}
    if entries:
        data["loras"] = entries
    elif isinstance(data.get("loras"), str):
        try:
            data["loras"] = json.loads(data["loras"])
        except ValueError:
            raise _bad("loras", 'send loras[][name] and loras[][scale] fields, or JSON: [{"name": ...}]') from None
    return data


def _reference(value: Any, param: str) -> bytes:
    """The bytes of an image reference, ``{"image_url": ...}``."""
    if not isinstance(value, dict):
        raise _bad(param, 'must be an object, {"image_url": "data:image/png;base64,..."}')
    if "file_id" in value:
        raise _bad(param, "file_id is not supported here (no Files API); send image_url with a data: URL")
    url = value.get("image_url")
    if not isinstance(url, str) or not url:
        raise _bad(param, 'needs "image_url": a data: URL (data:image/png;base64,...)', "missing")
    return decode_string(url, param)


async def _from_json(request: Request) -> EditForm:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.", code="invalid_value") from None
    if not isinstance(body, dict):
        raise APIError(400, "The body must be a JSON object.", code="invalid_value")
    images = body.pop("images", None)
    if "image" in body:
        raise _bad("image", 'in JSON, send "images": [{"image_url": "data:..."}]; "image" is for multipart')
    if not isinstance(images, list) or not images:
        raise _bad("images", 'this field is required: [{"image_url": "data:image/png;base64,..."}]', "missing")
    if len(images) > 1:
        raise _bad("images", f"one image per request is supported here, not {len(images)}", "too_many_images")
    mask = body.pop("mask", None)
    fields = _validated(OpenAIEditRequest, body, strict=True)
    image = _reference(images[0], "images")
    return EditForm(fields=fields, image=image, mask=None if mask is None else _reference(mask, "mask"))


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_edit(request: Request) -> EditForm:
    """An edit's body: multipart, or OpenAI's JSON form with image URLs."""
    media = _media_type(request)
    if media == "multipart/form-data":
        return await _from_form(request, OpenAIEditRequest, mask_allowed=True)
    if media == "application/json":
        return await _from_json(request)
    raise APIError(
        415,
        "Send the edit as multipart/form-data (image files) or application/json (images as data: URLs).",
        code="unsupported_media_type",
    )


async def read_variation(request: Request) -> EditForm:
    """A variation's body: multipart only, as OpenAI's."""
    if _media_type(request) != "multipart/form-data":
        raise APIError(415, "Send the variation as multipart/form-data.", code="unsupported_media_type")
    return await _from_form(request, OpenAIVariationRequest, mask_allowed=False)
