"""The settings for running where memory is small: how the model is loaded (quantized components, T5 or not, where
the text encoders live), tiled decoding, and admission by measured memory. ``Settings`` inherits them; they are
flags and SERVER_* variables like every other option, validated before the model loads."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from models.options import LoadOptions, parse_quantize

__all__ = ["MemorySettings"]

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d{1,3})?)$")


class MemorySettings(BaseSettings):
    """The small-memory options (docs/operations/small-memory.md)."""

    quantize: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="quantize a component's weights at load: COMPONENT=TYPE, COMPONENT transformer, text_encoder, "
        "text_encoder_2 or text_encoder_3, TYPE int8 (weight-only, any device) or fp8 (a GPU of compute capability "
        "8.9+); repeat the flag for more (environment: comma-separated) (default: none)",
    )
    no_t5: bool = Field(
        False, description="load the pipeline without its T5 text encoder (SD3's text_encoder_3=None): less memory"
    )
    encoders_device: str | None = Field(
        None,
        description="cpu, mps, cuda or cuda:N: keep the text encoders there, placed once at load; their embeddings "
        "move to the transformer's device (default: the transformer's device)",
    )
    vae_tiling: str = Field(
        "off",
        description="decode in tiles (diffusers' tiled VAE decode): on, off, or auto (images larger than "
        "--vae-tiling-above pixels)",
    )
    vae_tiling_above: int = Field(
        1024 * 1024, ge=1, description="--vae-tiling auto: images of more pixels than this (width x height) are tiled"
    )
    memory_admission: str = Field(
        "on",
        description="on: admit requests by their measured memory (a pass's and a decode's peak, measured at start-up "
        "and as requests run alone, must fit the free memory less --memory-reserve); off: slots and pixels only",
    )
    memory_budget: str = Field(
        "0",
        description="one server's memory budget: bytes (1073741824), a size (6GB, 500MB, 1.5GiB) or a fraction of the "
        "device (0.8). One model: what the running requests may take (0: the free memory measured after the "
        "load). Several models: their weights and the running requests together; models are unloaded to stay in it "
        "(0: the device's memory less --memory-reserve)",
    )
    memory_reserve: int = Field(
        512 * 1024 * 1024, ge=0, description="bytes of the free memory kept out of the requests' budget"
    )
    memory_wait: float = Field(
        0.0,
        ge=0,
        description="seconds a request may be expected to wait for memory before it is refused 503 with Retry-After "
        "(0: the request timeout)",
    )

    @field_validator("quantize", mode="before")
    @classmethod
    def _split_quantize(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment's form: transformer=int8,text_encoder_3=int8
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("quantize")
    @classmethod
    def _check_quantize(cls, value: list[str]) -> list[str]:
        parse_quantize(value)
        return value

    @field_validator("encoders_device")
    @classmethod
    def _check_encoders_device(cls, value: str | None) -> str | None:
        if value is not None and not _DEVICE.match(value.lower()):
            raise ValueError("encoders_device must be cpu, mps, cuda or cuda:N")
        return value.lower() if value else value

    @field_validator("vae_tiling")
    @classmethod
    def _check_vae_tiling(cls, value: str) -> str:
        if value.lower() not in ("on", "off", "auto"):
            raise ValueError("vae_tiling must be on, off or auto")
        return value.lower()

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _check_memory_budget(cls, value: Any) -> str:
        from registry.memory import parse_memory

        text = str(value).strip()
        if text != "0":  # 0: see the description
            parse_memory(text, 1)  # the syntax now; a fraction is of the device, known once it is chosen
        return text

    @field_validator("memory_admission")
    @classmethod
    def _check_memory_admission(cls, value: str) -> str:
        if value.lower() not in ("on", "off"):
            raise ValueError("memory_admission must be on or off")
        return value.lower()

    @model_validator(mode="after")
    def _check_t5(self) -> MemorySettings:
        if self.no_t5 and "text_encoder_3" in parse_quantize(self.quantize):
            raise ValueError("--quantize text_encoder_3 cannot be used with --no-t5: there is no T5 to quantize")
        return self

    @property
    def load_options(self) -> LoadOptions:
        """How the model is loaded (models.options.LoadOptions): one value per model load."""
        return LoadOptions(
            quantize=parse_quantize(self.quantize), t5=not self.no_t5, encoders_device=self.encoders_device
        )

    def tiles(self, width: int, height: int) -> bool:
        """Whether an image of ``width`` x ``height`` is decoded in tiles."""
        return self.vae_tiling == "on" or (self.vae_tiling == "auto" and width * height > self.vae_tiling_above)
