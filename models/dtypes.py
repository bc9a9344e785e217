"""The ``--dtype`` names the server accepts and the torch dtype each one means, by name (no torch here: the settings
validate a name before anything heavy is imported; ``Pipelines.DTYPES`` maps the names to torch dtypes)."""

from __future__ import annotations

__all__ = ["DTYPE_ALIASES"]

DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
