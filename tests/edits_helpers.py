"""Images for the edit tests: made here, byte by byte where PIL cannot write what a test needs (16-bit RGB, a header
that claims a huge canvas)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of random pixels (it barely compresses: its PNG is about 3 bytes a pixel)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: any header (``rows``: the filtered scanlines; default none, a header that lies)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows or b""))
        + _chunk(b"IEND", b"")
    )


def rgb16_png(width: int = 16, height: int = 16) -> bytes:
    """A valid 16-bit-per-channel RGB PNG (PIL opens it as 8-bit RGB without a word)."""
    row = b"\x00" + bytes(range(256))[: width * 6].ljust(width * 6, b"\x7f")
    return raw_png(width, height, 16, 2, row * height)


def animated(fmt: str = "PNG") -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def openai_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """OpenAI's mask: opaque everywhere but ``box``, fully transparent (the part to edit)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def white_repaints(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """The same mask in diffusers' convention: white (repaint) in ``box``, black elsewhere."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask
