"""Settings: every option is a CLI flag and an environment variable (SERVER_<NAME>), validated before loading."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.settings_jobs import JobSettings
from api.settings_memory import MemorySettings
from api.settings_models import ModelsSettings, strip_model_prefix
from models.dtypes import DTYPE_ALIASES

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "max_image_bytes", "parse_settings"]

ENV_PREFIX = "SERVER_"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


class Settings(ModelsSettings, MemorySettings, JobSettings, BaseSettings):
    """Server configuration. CLI flags override environment variables, which override defaults. The small-memory
    options (quantization, T5, the encoders' device, tiled decoding, memory admission) are ``MemorySettings``'."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    type_models: str = Field("t2im", description="pipeline type; only t2im (text-to-image) today")
    host: str = Field("0.0.0.0", description="address to bind")
    port: int = Field(8500, ge=0, le=65535, description="port to bind (0: any free port)")
    device: str | None = Field(
        None, description="auto, cpu, mps, cuda or cuda:N (default: auto, which picks cuda, then mps, then cpu)"
    )
    dtype: str | None = Field(
        None,
        description="auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16) "
        "(default: auto, which is bfloat16 on CUDA, float16 on MPS, float32 on CPU)",
    )
    data_dir: str = Field(
        ".",
        description="the server's data directory, which must exist: it holds the images (images/, unless --image-dir) "
        "and the jobs (jobs.db, unless --job-store) (default: the working directory)",
    )
    image_dir: str | None = Field(None, description="directory of generated images (default: the data dir's images/)")
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
        "the transformer across requests at every denoising step) (default: threads, on every device; step with "
        "--compile)",
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="step engine: most images in one transformer pass, both guidance halves counted"
    )
    step_loops: int = Field(
        0,
        ge=0,
        le=256,
        description="step engine, CPU: denoising loops, each with an equal share of the cores (0: as many as the "
        "start-up calibration measures best; set it for the same images across restarts); one on other devices and "
        "with --compile",
    )
    prompt_cache_size: int = Field(
        256, ge=0, le=1_000_000, description="prompt embeddings kept in an LRU cache, both engines (0: off)"
    )
    compile: bool = Field(
        False, description="step engine: compile the transformer's repeated blocks with torch.compile (regional)"
    )
    lora: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a LoRA adapter requests may name: NAME=PATH, PATH a .safetensors file in diffusers' format (or a "
        "folder holding one), or MODEL:NAME=PATH for a model other than the default; repeat the flag for more "
        "(environment: comma-separated) (default: none)",
    )
    lora_dir: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a folder of LoRA adapters (*.safetensors), each named by its file name, loaded on first use; "
        "MODEL:DIR for a model other than the default, repeating the flag (default: none)",
    )
    max_loras: int = Field(
        8, ge=1, le=1000, description="LoRA adapters loaded at once; beyond, the least recently used idle one goes"
    )
    max_queue: int = Field(64, ge=0, le=100_000, description="requests that may wait for a slot; beyond: 503")
    max_pixels_in_flight: int = Field(
        0,
        ge=0,
        description="pixels (width x height x images) the generations running at once may hold; a request waits "
        "in the queue until its pixels are free, and one larger than this is refused 400 (0: one largest request, "
        "max-image-size squared x max-images-per-request)",
    )
    request_timeout: float = Field(300.0, ge=0, description="seconds before a request is answered 504 (0: none)")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds to let in-flight requests finish on SIGTERM")
    progress_log_interval: float = Field(
        10.0, ge=0, description="a running generation logs its step every this many seconds (0: never)"
    )
    image_ttl: float = Field(86_400.0, ge=0, description="seconds generated images are kept (0: forever)")
    image_max_files: int = Field(10_000, ge=0, description="most images kept on disk, oldest go first (0: no cap)")
    image_max_bytes: int = Field(0, ge=0, description="most bytes of images kept on disk, oldest go first (0: no cap)")
    image_grace: float = Field(
        300.0, ge=1, description="seconds a new image is kept whatever the caps, so every returned URL can be fetched"
    )
    served_model_name: str | None = Field(
        None, description="model name shown to clients (default: the hub id or preset; a local path's last part)"
    )
    api_key: str | None = Field(None, description="if set, generation endpoints need 'Authorization: Bearer KEY'")
    metrics_auth: bool = Field(False, description="/metrics needs the API key too (needs --api-key; default: open)")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS ('*' allows any, no cookies)")
    max_steps: int = Field(100, ge=1, le=1000, description="largest num_inference_steps accepted")
    default_steps: int = Field(28, ge=1, le=1000, description="num_inference_steps when the request has none")
    max_image_size: int = Field(1536, ge=16, le=8192, description="largest width or height accepted (pixels)")
    max_images_per_request: int = Field(10, ge=1, le=64, description="largest num_images_per_prompt / n accepted")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000, description="longest prompt accepted (characters)")
    max_body_bytes: int = Field(65_536, ge=1024, description="largest request body accepted (bytes); beyond: 413")
    max_upload_bytes: int = Field(
        20_971_520,
        ge=1024,
        description="largest body of the routes that take images (the edits, the variations, and the native and job "
        "routes, whose JSON may carry base64 images), bytes; beyond: 413",
    )
    max_input_side: int = Field(
        4096,
        ge=16,
        le=16_384,
        description="largest width or height of an input image (pixels), read from its header before it is decoded; "
        "beyond: 400. An input larger than --max-image-size is scaled down to fit",
    )
    max_header_bytes: int = Field(
        32_768, ge=1024, le=1_048_576, description="largest request line + headers (bytes); beyond: 431"
    )
    receive_timeout: float = Field(
        30.0, gt=0, description="seconds to receive a whole request (headers and body) from its first byte; then 408"
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="seconds an open connection may sit idle before (and between) requests"
    )
    max_connections: int = Field(
        2048, ge=1, le=1_000_000, description="open connections served at once; beyond: 503 (capped by the fd limit)"
    )
    send_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a response may wait on a client that does not read it; then the connection closes",
    )
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("public_url must start with http:// or https:// and name a host")
        return value.rstrip("/") if value else value

    @field_validator("metrics_auth")
    @classmethod
    def _check_metrics_auth(cls, value: bool, info: ValidationInfo) -> bool:
        # A field check (not a model check), so that the error names the flag or variable the user set.
        if value and not info.data.get("api_key"):
            raise ValueError("needs --api-key (SERVER_API_KEY): there is no key to guard /metrics with")
        return value

    @field_validator("type_models")
    @classmethod
    def _check_type(cls, value: str) -> str:
        if value != "t2im":
            raise ValueError("type_models must be 't2im' (text-to-image)")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        # Availability (is there a CUDA device?) needs torch: checked by Pipelines.preflight, still before loading.
        if value is not None and not _DEVICE.match(value.lower()):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        return value.lower() if value else value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in ("auto", *DTYPE_ALIASES):
            raise ValueError("dtype must be auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
        return value.lower() if value else value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return value.lower()

    @field_validator("lora", "lora_dir", mode="before")
    @classmethod
    def _split_loras(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment's form: NAME=PATH,NAME=PATH
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("lora")
    @classmethod
    def _check_lora_syntax(cls, value: list[str]) -> list[str]:
        from api.adapters import parse_lora_options

        # Each entry alone (a MODEL: prefix set aside); names per model are checked once the models are known.
        for entry in value:
            parse_lora_options([strip_model_prefix(entry)])
        return value

    @field_validator("lora_dir")
    @classmethod
    def _check_lora_dirs(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not Path(entry).expanduser().is_dir() and not Path(strip_model_prefix(entry)).expanduser().is_dir():
                raise ValueError(f"{entry}: no such directory (make it, or name another)")
        return value

    @model_validator(mode="after")
    def _check_loras(self) -> Settings:
        from api.adapters import parse_lora_options

        # The files themselves are checked before loading (serverasync.check_adapters).
        for model, entries in self.loras_by_model().items():
            try:
                parse_lora_options(entries)
            except ValueError as exc:
                raise ValueError(f"--lora: {exc}") from None
            if len(entries) > self.max_loras:
                whose = "" if model == self.default_model else f" of {model}"
                raise ValueError(
                    f"max_loras ({self.max_loras}) is below the {len(entries)} adapters{whose} named with --lora"
                )
        try:
            self.lora_dirs()
        except ValueError as exc:
            raise ValueError(f"--lora-dir: {exc}") from None
        return self

    @field_validator("data_dir")
    @classmethod
    def _check_directory(cls, value: str | None) -> str | None:
        if value and not Path(value).expanduser().is_dir():
            raise ValueError(f"{value}: no such directory (make it, or name another)")
        return value

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: str | None) -> str | None:
        if value is not None and value.lower() not in ("threads", "step"):
            raise ValueError("engine must be 'threads' or 'step'")
        return value.lower() if value is not None else None

    @model_validator(mode="after")
    def _in_data_dir(self) -> Settings:
        """The images and the job store the data directory holds, where they are not set on their own."""
        data = Path(self.data_dir)
        if self.image_dir is None:
            self.image_dir = str(data / "images")
        if self.job_store is None:
            self.job_store = f"sqlite:///{data / 'jobs.db'}"
        return self

    @model_validator(mode="after")
    def _check_steps(self) -> Settings:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) is above max_steps ({self.max_steps})")
        if self.compile and self.engine == "threads":
            # Several threads calling one compiled module is unsafe; only the step engine has a single caller.
            raise ValueError("compile needs --engine step: the threads engine calls the transformer from many threads")
        if self.compile and (self.lora or self.lora_dir):
            # A compiled graph bakes in the adapters it was traced with; switching them per pass would recompile.
            raise ValueError("compile cannot serve LoRA adapters (--lora, --lora-dir): use one or the other")
        return self

    @model_validator(mode="after")
    def _check_retention(self) -> Settings:
        # Retention must be able to hold one whole answer: a URL we return has to stay fetchable.
        n = self.max_images_per_request
        if 0 < self.image_max_files < n:
            raise ValueError(
                f"image_max_files ({self.image_max_files}) cannot hold one request's {n} images "
                f"(max_images_per_request); use at least {n}, or 0 for no cap"
            )
        largest = n * max_image_bytes(self.max_image_size)
        if 0 < self.image_max_bytes < largest:
            raise ValueError(
                f"image_max_bytes ({self.image_max_bytes}) cannot hold one request's images: {n} images of "
                f"{self.max_image_size}x{self.max_image_size} may take {largest} bytes; use at least that, or 0"
            )
        if 0 < self.image_ttl < self.image_grace:
            raise ValueError(f"image_ttl ({self.image_ttl:g}) is below image_grace ({self.image_grace:g})")
        if 0 < self.job_ttl < self.job_grace:
            raise ValueError(f"job_ttl ({self.job_ttl:g}) is below job_grace ({self.job_grace:g})")
        return self

    @property
    def model_name(self) -> str:
        """The model's name as clients see it: --served-model-name, else the hub id or preset, else the last part of
        a local path (a file system path is never shown to a client)."""
        if self.served_model_name:
            return self.served_model_name
        spec = next(spec for spec in self.model_specs if spec.default)
        if spec.name != spec.source:  # named: --model NAME=SOURCE
            return spec.name
        path = Path(spec.source).expanduser()
        if path.is_absolute() or spec.source.startswith((".", "~")) or path.exists():
            return path.resolve().name or "model"
        return spec.source

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def max_image_bytes(side: int) -> int:
    """An upper bound on one image of ``side`` x ``side`` RGB pixels in any output format.

    A PNG of noise barely compresses: raw size plus framing. The lossy formats stay below it even at quality 100 (noise
    at 1024x1024: PNG 3.15 MB, JPEG 2.07 MB, WebP 1.17 MB).
    """
    raw = side * (side * 3 + 1)  # a filter byte per row
    return raw + raw // 100 + 4096


class SettingsError(ValueError):
    """Options that failed validation; ``lines`` has one message per problem, naming what the user set."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def parse_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the command line (flags named after the fields) over the environment.

    Raises ``SettingsError`` whose lines name the flag the user typed (``--max-queue``) or the environment variable
    they set (``SERVER_MAX_QUEUE``). argparse's own errors (unknown flag) exit 2 as usual.
    """
    parser = argparse.ArgumentParser(
        prog="serverasync.py",
        description="Async inference server for Stable Diffusion 3 / 3.5. Every flag is also an environment "
        f"variable: {ENV_PREFIX}<FLAG_IN_CAPITALS>, e.g. {ENV_PREFIX}MAX_QUEUE=16.",
    )
    for name, info in Settings.model_fields.items():
        help_text = str(info.description)
        if "(default:" not in help_text:  # one default per flag: the description's own, or this one
            help_text += f" (default: {'none' if info.default is None else info.default})"
        if info.annotation is bool:  # a switch: --compile (SERVER_COMPILE=1 in the environment)
            parser.add_argument(_flag(name), dest=name, action="store_true", default=None, help=help_text)
            continue
        if info.annotation == list[str]:  # repeatable: --lora a=x.safetensors --lora b=y, --quantize ...
            parser.add_argument(_flag(name), dest=name, action="append", default=None, help=help_text)
            continue
        parser.add_argument(_flag(name), dest=name, default=None, help=help_text)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**args)
    except ValidationError as exc:
        environ = os.environ if environ is None else environ
        raise SettingsError([_describe(error, args, environ) for error in exc.errors()]) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(error: Any, flags: dict[str, Any], environ: Mapping[str, str]) -> str:
    """One line for one problem, prefixed with what the user set: a flag, or an environment variable."""
    message = str(error["msg"]).removeprefix("Value error, ")
    loc = tuple(error["loc"])
    name = str(loc[0]) if loc else ""
    if name not in Settings.model_fields:  # a cross-field check: no single option to name
        return message
    if name in flags:
        return f"{_flag(name)}: {message}"
    variables = [f"{ENV_PREFIX}{name.upper()}", *(["MODEL_PATH"] if name == "model" else [])]
    given = next((v for v in variables if v in environ), variables[0])
    return f"{given}: {message}"
