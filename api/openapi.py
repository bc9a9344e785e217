"""The OpenAPI document, with the configured limits (tighter than the schema's hard bounds) published in it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api.schemas import OPENAI_MAX_N
from api.settings import Settings

__all__ = ["publish_limits"]


def publish_limits(app: FastAPI, settings: Settings) -> None:
    """Put the configured limits (tighter than the schema's hard bounds) into /openapi.json and /docs."""
    build = app.openapi
    images = settings.max_images_per_request
    limits = {
        "InferenceRequest": {
            "prompt": ("maxLength", settings.max_prompt_chars),
            "negative_prompt": ("maxLength", settings.max_prompt_chars),
            "num_inference_steps": ("maximum", settings.max_steps),
            "num_images_per_prompt": ("maximum", images),
            "height": ("maximum", settings.max_image_size),
            "width": ("maximum", settings.max_image_size),
        },
        "OpenAIImageRequest": {
            "prompt": ("maxLength", settings.max_prompt_chars),
            "negative_prompt": ("maxLength", settings.max_prompt_chars),
            "num_inference_steps": ("maximum", settings.max_steps),
            "n": ("maximum", min(OPENAI_MAX_N, images)),
        },
    }
    limits["JobRequest"] = limits["InferenceRequest"]  # a job's body is the native body (and preview_every)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            for model, fields in limits.items():
                for field, (key, value) in fields.items():
                    prop = schemas[model]["properties"][field]
                    # An optional field is anyOf[<type>, null]: the bound sits on the typed branch.
                    for branch in prop.get("anyOf", [prop]):
                        if key in branch:
                            branch[key] = min(branch[key], value)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
