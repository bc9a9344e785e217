"""How one model is loaded beyond its name, device and dtype: quantized components, T5 or not, where the text
encoders live. Light (no torch): the settings validate these before anything loads.

The options belong to one model load (a ``LoadOptions`` value handed to the loader), never to module state, so that
a server holding several models can load each its own way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["QUANT_COMPONENTS", "QUANT_TYPES", "LoadOptions", "parse_quantize"]

# The components whose weights can be quantized: the transformer (most of the compute) and the text encoders (T5-XXL
# alone is 4.8B parameters). The VAE stays as loaded: it is small and its convolutions are not quantized by quanto.
QUANT_COMPONENTS: tuple[str, ...] = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# Weight-only types: int8 (any device; 1 byte a weight plus a scale per output row) and fp8 (e4m3, 1 byte a weight;
# a CUDA GPU of compute capability 8.9 or more: Ada, Hopper).
QUANT_TYPES: tuple[str, ...] = ("int8", "fp8")


def parse_quantize(values: Iterable[str]) -> dict[str, str]:
    """``["transformer=int8", ...]`` -> ``{"transformer": "int8"}``; ValueError saying what to write instead."""
    spec: dict[str, str] = {}
    for value in values:
        component, sep, kind = (part.strip() for part in value.partition("="))
        if not sep or not component or not kind:
            raise ValueError(f"{value!r} is not COMPONENT=TYPE, e.g. transformer=int8")
        if component not in QUANT_COMPONENTS:
            raise ValueError(f"{component!r} cannot be quantized; use one of: {', '.join(QUANT_COMPONENTS)}")
        if kind.lower() not in QUANT_TYPES:
            raise ValueError(f"{kind!r} is not a quantization type; use one of: {', '.join(QUANT_TYPES)}")
        if component in spec and spec[component] != kind.lower():
            raise ValueError(f"{component} is given twice ({spec[component]} and {kind.lower()})")
        spec[component] = kind.lower()
    return spec


@dataclass(frozen=True)
class LoadOptions:
    """One model load's options (see the module's docstring)."""

    quantize: Mapping[str, str] = field(default_factory=dict)  # component -> "int8" | "fp8"
    t5: bool = True  # False: no third text encoder (text_encoder_3=None, tokenizer_3=None)
    encoders_device: str | None = None  # the text encoders' device (None: the transformer's)

    def __post_init__(self) -> None:
        if not self.t5 and "text_encoder_3" in self.quantize:
            raise ValueError("text_encoder_3 cannot be quantized without T5 (--no-t5 leaves it out)")

    def describe(self) -> dict[str, object]:
        """What /api/status and the prompt cache's key say about the load."""
        return {"quantize": dict(self.quantize), "t5": self.t5, "encoders_device": self.encoders_device}
