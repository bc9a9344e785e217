"""Request and response models of both APIs.

Hard bounds live in the schema; the configured (tighter) limits are checked in ``api.generation.to_generation`` and
published in the OpenAPI document by ``api.openapi``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Prompt = Annotated[str, Field(min_length=1, max_length=100_000)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="seed for reproducible images; drawn when absent")]
Steps = Annotated[int, Field(ge=1, le=1000)]
Side = Annotated[int, Field(ge=16, le=8192, description="pixels, a multiple of 16")]
Guidance = Annotated[float, Field(ge=0.0, le=50.0)]
OPENAI_MAX_N = 10  # the OpenAI Images API's own bound on n
OutputFormat = Literal["png", "jpeg", "webp"]
OPENAI_MAX_PARTIAL_IMAGES = 3  # and on partial_images
MAX_LORAS_PER_REQUEST = 8
MAX_LORA_SCALE = 4.0  # |scale|: four times its trained strength is already far outside what an adapter was made for


class LoraChoice(BaseModel):
    """One LoRA adapter for one request (``GET /v1/models`` lists them)."""

    # strict, as the bodies that hold it: `true` and "1" are not a scale (a JSON integer is: 1 is 1.0). The multipart
    # edits read their text fields leniently (api/edit_forms.py), so "0.5" from a form is still a scale there.
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(min_length=1, max_length=64, description="an adapter's name (GET /v1/models)")]
    scale: Annotated[float, Field(ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)] = Field(
        1.0, description="how strongly it applies (diffusers' set_adapters weight; 1: as trained, 0: not at all)"
    )


Loras = Annotated[list[LoraChoice], Field(max_length=MAX_LORAS_PER_REQUEST)] | None
LORAS_DESCRIPTION = "LoRA adapters for this request, applied together in this order (default: none, the base model)"
# An input image as a string (base64 or a data: URL); the body as a whole is bounded by --max-upload-bytes.
ImageString = Annotated[str, Field(min_length=1, max_length=200_000_000)]
Strength = Annotated[float, Field(gt=0.0, le=1.0)]
# OpenAI answers its gpt-image-* models in base64 only, so their clients send no response_format and read b64_json.
RESPONSE_FORMAT_DESCRIPTION = "url or b64_json (default: b64_json when model names gpt-image-*, as OpenAI's; else url)"


def response_format_of(body: object) -> str:
    """The ``response_format`` a request gets: its own, else OpenAI's default for its ``model``."""
    chosen = getattr(body, "response_format", None)
    if chosen:
        return chosen
    model = getattr(body, "model", None) or ""
    return "b64_json" if model.lower().startswith("gpt-image") else "url"


MAX_MASK_BLUR = 64  # pixels: a band of up to ~3 x 64 px each side of the seam, already most of a 512 px image
MaskBlur = Annotated[int, Field(ge=0, le=MAX_MASK_BLUR)]
MASK_BLUR_DESCRIPTION = (
    f"with a mask: a feather at the mask's edge, in pixels (0..{MAX_MASK_BLUR}; default 0, a hard edge): the "
    "Gaussian blur's radius of the mask that blends the repainted image into the input, over a band of at most "
    "3 x mask_blur pixels each side of the edge (A1111's mask_blur)"
)


class OutputOptions(BaseModel):
    """How the answered images are encoded, with OpenAI's field names: shared by every generation body."""

    output_format: OutputFormat | None = Field(None, description="png (default, lossless), jpeg or webp")
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = Field(
        None,
        description="compression level in percent, higher gives smaller files (default 10). jpeg and webp: quality "
        "100 - output_compression; png stays lossless, this picks the zlib level (0: none, 100: level 9)",
    )


class InferenceRequest(OutputOptions):
    """Body of POST /api/diffusers/inference."""

    # strict: `true` is not 1 step and "5" is not a seed; JSON numbers still fill float fields.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    model: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="the model to run (GET /v1/models); default: the server's default model"
    )
    negative_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    num_inference_steps: Steps | None = Field(None, description="default: the server's --default-steps")
    num_images_per_prompt: Annotated[int, Field(ge=1, le=64)] = 1
    seed: Seed | None = None
    guidance_scale: Guidance | None = Field(None, description="default: the pipeline's (7.0 for SD3)")
    loras: Loras = Field(None, description=LORAS_DESCRIPTION)
    height: Side | None = Field(None, description="default: the model's native size, or an image's own (see image)")
    width: Side | None = Field(None, description="default: the model's native size, or an image's own (see image)")
    # Edits (api/edits.py): an image makes the request image-to-image; an image and a mask, inpainting.
    image: ImageString | None = Field(
        None,
        description="an image to edit, base64 or a data: URL (PNG, JPEG or WebP); the size defaults to its own, "
        "scaled down to fit the largest side and rounded to the model's multiple",
    )
    mask_image: ImageString | None = Field(
        None,
        description="with image: inpainting; the image's size, white repaints and black keeps (diffusers'), every "
        "other pixel is the image's own in the answer; a mask with transparent pixels is refused (that is OpenAI's "
        "convention: send it to /v1/images/edits)",
    )
    strength: Strength | None = Field(
        None,
        description="with image: how much of the schedule runs, (0, 1] (default: image-to-image 0.6, inpainting 1)",
    )
    mask_blur: MaskBlur | None = Field(None, description=MASK_BLUR_DESCRIPTION)


class ResolvedParameters(BaseModel):
    """The parameters a generation ran with; a server of several models adds ``model``, the one that served it (a
    server of one model answers as it always did)."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    num_images_per_prompt: int
    guidance_scale: float | None
    height: int
    width: int
    output_format: OutputFormat
    output_compression: int
    loras: list[LoraChoice] = Field(default_factory=list, description="the LoRA adapters used, in order")
    task: str = Field("text-to-image", description="text-to-image, image-to-image or inpainting")
    strength: float | None = Field(None, description="the strength used (edits only)")
    mask_blur: int | None = Field(None, description="the feather used at the mask's edge, pixels (inpainting only)")


class InferenceResponse(BaseModel):
    response: list[str] = Field(description="absolute URLs of the generated images")
    seed: int
    parameters: ResolvedParameters
    request_id: str


class OpenAIImageRequest(OutputOptions):
    """Body of POST /v1/images/generations (OpenAI Images API). Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: Prompt
    model: Annotated[str, Field(max_length=256)] | None = None
    n: Annotated[int, Field(ge=1, le=OPENAI_MAX_N)] = 1
    size: Annotated[str, Field(max_length=16, description="'WIDTHxHEIGHT' or 'auto'")] | None = None
    response_format: Literal["url", "b64_json"] | None = Field(None, description=RESPONSE_FORMAT_DESCRIPTION)
    quality: Annotated[str, Field(max_length=32)] | None = None
    style: Annotated[str, Field(max_length=32)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Streaming (api/streaming.py): Server-Sent Events, partial images while it denoises, then the images.
    stream: bool | None = Field(False, description="answer Server-Sent Events (text/event-stream) in OpenAI's shape")
    partial_images: Annotated[int, Field(ge=0, le=OPENAI_MAX_PARTIAL_IMAGES)] | None = Field(
        None, description="streaming: partial images (previews) per image, spread over the steps"
    )
    # Extensions (send with the client's extra_body): reproducibility and sampling controls.
    seed: Seed | None = None
    negative_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    loras: Loras = Field(None, description=LORAS_DESCRIPTION + "; `model` may also name one (at scale 1)")


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: OutputFormat | None = None
    size: str | None = Field(None, description="'WIDTHxHEIGHT' of the images")
    loras: list[LoraChoice] | None = Field(None, description="the LoRA adapters used, in order (absent: none)")


class JobRequest(InferenceRequest):
    """Body of POST /api/jobs: the native body, and previews."""

    preview_every: Annotated[int, Field(ge=0, le=1000)] = Field(
        0, description="a preview of every image after every N steps, in the job's events (0: none)"
    )


class ErrorBody(BaseModel):
    """The error envelope's inner object (the envelope itself is ``api.errors.ErrorResponse``)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class JobCreated(BaseModel):
    id: str
    status: Literal["queued"]
    status_url: str = Field(description="GET it for the job's state; DELETE it to cancel")
    events_url: str = Field(description="Server-Sent Events: queued, started, step, preview, done")


class JobState(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float = Field(description="unix seconds")
    position: int | None = Field(description="place in the queue, 1 = next; null unless queued")
    step: int = Field(description="denoising steps done")
    total_steps: int
    eta_s: float | None = Field(
        description="seconds left, from the step rate so far; null before the first step, once no steps are left, "
        "and while waiting_for_takeover"
    )
    seed: int
    result: InferenceResponse | None = Field(
        description="the answer of POST /api/diffusers/inference, once succeeded; its image URLs are built for this "
        "request (its Host, or --public-url), whichever server made or ran the job"
    )
    error: ErrorBody | None = Field(description="the error envelope's inner object, once failed")
    runner_renewed_at: float | None = Field(
        description="sqlite/redis job stores: unix seconds when the server running the job last renewed its claim "
        "(its lease); null when no server holds it (finished, or waiting for a server), and in the memory store"
    )
    waiting_for_takeover: bool = Field(
        description="sqlite/redis job stores: the server running the job has stopped renewing its claim (it died, "
        "or lost the store): the job waits for its lease (--job-lease) to run out and another server to run it "
        "again; eta_s is null meanwhile"
    )
