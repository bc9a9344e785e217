"""Settings: every option is a CLI flag and an environment variable (SERVER_<NAME>), validated before loading."""

from __future__ import annotations

import argparse
import re

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ENV_PREFIX", "Settings", "parse_settings"]

ENV_PREFIX = "SERVER_"


class Settings(BaseSettings):
    """Server configuration. CLI flags override environment variables, which override defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    model: str = Field(
        "stabilityai/stable-diffusion-3.5-medium",
        validation_alias=AliasChoices("model", f"{ENV_PREFIX}MODEL", "MODEL_PATH"),
        description="hub id, local save_pretrained directory, or random:tiny / random:sd3.5-medium "
        "(env SERVER_MODEL or MODEL_PATH)",
    )
    type_models: str = Field("t2im", description="pipeline type; only t2im (text-to-image) today")
    host: str = Field("0.0.0.0", description="address to bind")
    port: int = Field(8500, ge=0, le=65535, description="port to bind (0: any free port)")
    device: str | None = Field(None, description="cuda, cuda:1, mps or cpu (default: cuda, then mps, then cpu)")
    dtype: str | None = Field(None, description="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    image_dir: str = Field("images", description="directory for generated images")
    public_url: str | None = Field(
        None, description="base URL put in image links, e.g. https://img.example.com (default: the request's host)"
    )
    max_concurrency: int | None = Field(
        None,
        ge=1,
        le=256,
        description="requests admitted at once (default: threads 2, the cores split between them on a CPU; step 16, "
        "which encode, join the shared denoising loop and decode)",
    )
    engine: str | None = Field(
        None,
        description="threads (a pipeline call per request, each in its own slot thread) or step (one worker batches "
        "the transformer across requests at every denoising step) (default: step on a CPU, threads on a GPU)",
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="step engine: most images in one transformer pass, both guidance halves counted"
    )
    prompt_cache_size: int = Field(
        256, ge=0, le=1_000_000, description="prompt embeddings kept in an LRU cache, both engines (0: off)"
    )
    compile: bool = Field(
        False, description="step engine: compile the transformer's repeated blocks with torch.compile (regional)"
    )
    max_queue: int = Field(64, ge=0, le=100_000, description="requests that may wait for a slot; beyond: 503")
    request_timeout: float = Field(300.0, ge=0, description="seconds before a request is answered 504 (0: none)")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds to let in-flight requests finish on SIGTERM")
    image_ttl: float = Field(86_400.0, ge=0, description="seconds generated images are kept (0: forever)")
    image_max_files: int = Field(10_000, ge=0, description="most images kept on disk, oldest go first (0: no cap)")
    image_max_bytes: int = Field(0, ge=0, description="most bytes of images kept on disk, oldest go first (0: no cap)")
    api_key: str | None = Field(None, description="if set, generation endpoints need 'Authorization: Bearer KEY'")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS ('*' allows any, no cookies)")
    max_steps: int = Field(100, ge=1, le=1000, description="largest num_inference_steps accepted")
    default_steps: int = Field(28, ge=1, le=1000, description="num_inference_steps when the request has none")
    max_image_size: int = Field(1536, ge=16, le=8192, description="largest width or height accepted (pixels)")
    max_images_per_request: int = Field(10, ge=1, le=64, description="largest num_images_per_prompt / n accepted")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000, description="longest prompt accepted (characters)")
    max_body_bytes: int = Field(65_536, ge=1024, description="largest request body accepted (bytes); beyond: 413")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("public_url must start with http:// or https:// and name a host")
        return value.rstrip("/") if value else value

    @field_validator("type_models")
    @classmethod
    def _check_type(cls, value: str) -> str:
        if value != "t2im":
            raise ValueError("type_models must be 't2im' (text-to-image)")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return value.lower()

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in ("threads", "step"):
            raise ValueError("engine must be 'threads' or 'step'")
        return value.lower() if value is not None else None

    @model_validator(mode="after")
    def _check_steps(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) is above max_steps ({self.max_steps})")
        if self.compile and self.engine == "threads":
            # Several threads calling one compiled module is unsafe; only the step engine has a single caller.
            raise ValueError("compile needs --engine step: the threads engine calls the transformer from many threads")
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Build Settings from the command line (flags named after the fields) over the environment."""
    parser = argparse.ArgumentParser(
        prog="serverasync.py",
        description="Async inference server for Stable Diffusion 3 / 3.5. Every flag is also an environment "
        f"variable: {ENV_PREFIX}<FLAG_IN_CAPITALS>, e.g. {ENV_PREFIX}MAX_QUEUE=16.",
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default
        if info.annotation is bool:  # a switch: --compile (SERVER_COMPILE=1 in the environment)
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=info.description)
            continue
        parser.add_argument(flag, dest=name, default=None, help=f"{info.description} [default: {default}]")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**args)
