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


class InferenceRequest(BaseModel):
    """Body of POST /api/diffusers/inference."""

    # strict: `true` is not 1 step and "5" is not a seed; JSON numbers still fill float fields.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    negative_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    num_inference_steps: Steps | None = Field(None, description="default: the server's --default-steps")
    num_images_per_prompt: Annotated[int, Field(ge=1, le=64)] = 1
    seed: Seed | None = None
    guidance_scale: Guidance | None = Field(None, description="default: the pipeline's (7.0 for SD3)")
    height: Side | None = Field(None, description="default: the model's native size")
    width: Side | None = Field(None, description="default: the model's native size")


class ResolvedParameters(BaseModel):
    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    num_images_per_prompt: int
    guidance_scale: float | None
    height: int
    width: int


class InferenceResponse(BaseModel):
    response: list[str] = Field(description="absolute URLs of the generated PNGs")
    seed: int
    parameters: ResolvedParameters
    request_id: str


class OpenAIImageRequest(BaseModel):
    """Body of POST /v1/images/generations (OpenAI Images API). Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: Prompt
    model: Annotated[str, Field(max_length=256)] | None = None
    n: Annotated[int, Field(ge=1, le=OPENAI_MAX_N)] = 1
    size: Annotated[str, Field(max_length=16, description="'WIDTHxHEIGHT' or 'auto'")] | None = None
    response_format: Literal["url", "b64_json"] | None = "url"
    quality: Annotated[str, Field(max_length=32)] | None = None
    style: Annotated[str, Field(max_length=32)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Extensions (send with the client's extra_body): reproducibility and sampling controls.
    seed: Seed | None = None
    negative_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


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
    eta_s: float | None = Field(description="seconds left, from the step rate so far; null before the first step")
    seed: int
    result: InferenceResponse | None = Field(description="the answer of POST /api/diffusers/inference, once succeeded")
    error: ErrorBody | None = Field(description="the error envelope's inner object, once failed")
