"""Input images (edits, variations, the native ``image`` and ``mask_image``): decoded and checked before they cost
anything.

An image arrives as a base64 string or a ``data:`` URL (native JSON, OpenAI's JSON ``image_url``) or as a multipart
upload (OpenAI's edits and variations). Every refusal is a 400 in the error envelope, before the request reaches the
engine:

- not base64, a ``data:`` URL that is not base64, or a remote ``http(s)://`` URL: the server never fetches a URL
  (that would let any client make it connect anywhere its network reaches: SSRF);
- not PNG, JPEG or WebP (the formats OpenAI accepts; PIL's other decoders are not exposed to clients);
- a width or height past ``--max-input-side``, read from the header before any pixel is decoded (``Image.open`` is
  lazy): a small file may claim a huge canvas, and PIL's decompression-bomb guard only stops at 89 million pixels
  (a warning; an error at twice that), far past what is useful here;
- animated (APNG, animated WebP) or 16 bits per channel: refused, not silently cut down to one frame or 8 bits;
- truncated or corrupt data (the decoder fails);
- a mask whose size is not the image's (after both are turned upright).

EXIF orientation is honoured (``ImageOps.exif_transpose``): the image is the way up a viewer shows it, and its
size is the upright one. Decoding runs in a thread (``read_inputs``), so a large or hostile image never stalls
the event loop and the other requests on it.

Masks: the engine's convention is diffusers' (an ``L`` image, white = repaint); ``native_mask`` takes any image in
that convention, ``openai_mask`` converts OpenAI's (the fully transparent pixels, alpha 0, are the ones to edit).
A mask is never read in the other API's convention: one with transparent pixels sent to the native API is refused
(its brightness alone would be read, and the white-on-transparent strokes of a canvas mean the very opposite of
OpenAI's transparent-is-edited, so its alpha cannot be followed safely either); one with no fully transparent pixel
sent to OpenAI's edits (no alpha channel, or all of it opaque: a white-on-black mask) would edit nothing, and is
refused too. Both refusals (code ``invalid_mask``) name the two conventions and where each goes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from api.errors import APIError

__all__ = ["ACCEPTED_FORMATS", "EditInputs", "decode_string", "open_image", "read_inputs", "resized"]

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}:")
_WHITESPACE = re.compile(rb"\s+")
MaskConvention = Literal["native", "openai"]


def _bad(param: str, message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def decode_string(text: str, param: str) -> bytes:
    """The bytes of an image sent as a string: base64, or a base64 ``data:`` URL. Remote URLs are refused."""
    text = text.strip()
    if text[:8].lower().startswith(("http://", "https://")):
        raise _bad(
            param,
            "remote URLs are not fetched by this server; send the image itself (a data: URL or base64)",
            "unsupported_url",
        )
    if text[:5].lower() == "data:":
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise _bad(param, "a data: URL must be base64, e.g. data:image/png;base64,iVBOR...")
    elif _SCHEME.match(text):
        raise _bad(param, "only data: URLs are accepted (or plain base64)", "unsupported_url")
    try:
        return base64.b64decode(_WHITESPACE.sub(b"", text.encode("ascii")), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _bad(param, "is not valid base64 (send the image's bytes base64-encoded, or a data: URL)") from None


def open_image(data: bytes, param: str, max_side: int) -> Any:
    """Decode ``data`` into a loaded, upright PIL image (its own mode), or raise the 400 that says what is wrong."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise _bad(param, "is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below, more tightly
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError:
            raise _too_large(param, None, max_side) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise _bad(param, "is not an image in a format this server reads (PNG, JPEG or WebP)") from None
        if max(image.size) > max_side:
            raise _too_large(param, image.size, max_side)
        if getattr(image, "n_frames", 1) > 1:
            raise _bad(param, "is animated; send a single-frame image")
        if _is_16_bit(image):
            raise _bad(param, "has 16 bits per channel; send an 8-bit image")
        try:
            image.load()
        except Exception:  # noqa: BLE001 - every decoder failure (truncated, corrupt) is the client's input
            raise _bad(param, "could not be decoded: the file is truncated or corrupt") from None
    return ImageOps.exif_transpose(image)


def _too_large(param: str, size: tuple[int, int] | None, max_side: int) -> APIError:
    claimed = f"is {size[0]}x{size[1]}" if size else "claims a size far too large"
    return _bad(param, f"{claimed}; the largest side accepted is {max_side} pixels (--max-input-side)", "too_large")


def _is_16_bit(image: Any) -> bool:
    """Whether the image has more than 8 bits per channel (PIL opens 16-bit RGB as RGB, its raw mode tells)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return True
    return any(";16" in str(tile.args) for tile in getattr(image, "tile", ()) or ())


NATIVE_CONVENTION = (
    "this API reads a mask by its brightness alone (diffusers' convention: white repaints, black keeps), so its "
    "transparency would be lost. Send an opaque mask, white where the image is repainted; or send this mask to "
    "/v1/images/edits, which follows OpenAI's convention (the fully transparent pixels, alpha 0, are edited)"
)
OPENAI_CONVENTION = (
    "this API follows OpenAI's convention: the fully transparent pixels (alpha 0) are edited, every other pixel is "
    "kept. Make the part to edit transparent; a white-on-black mask (diffusers' convention) goes to the native API's "
    "mask_image (/api/diffusers/inference)"
)


def _alpha(image: Any) -> Any | None:
    """The image's alpha channel (an alpha band, or a palette's or grey image's transparent colour); None: none."""
    if "A" in image.getbands():
        return image.getchannel("A")
    if "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def native_mask(image: Any, param: str = "mask_image") -> Any:
    """The engine's mask from one in diffusers' convention (white repaints, black keeps): its grey levels. A mask
    with any transparent pixel is refused (see the module's notes); a fully opaque RGBA one is its brightness."""
    alpha = _alpha(image)
    if alpha is not None and alpha.getextrema()[0] < 255:
        raise _bad(param, f"has transparent pixels (alpha below 255); {NATIVE_CONVENTION}", "invalid_mask")
    return image.convert("L")


def openai_mask(image: Any, param: str) -> Any:
    """The engine's mask from OpenAI's: the fully transparent pixels (alpha 0) are edited (white), the rest kept.
    A mask without any fully transparent pixel is refused (see the module's notes)."""
    alpha = _alpha(image)
    if alpha is None:
        raise _bad(param, f"has no alpha channel; {OPENAI_CONVENTION}", "invalid_mask")
    if alpha.getextrema()[0] > 0:
        raise _bad(
            param, f"has no fully transparent pixel, so nothing would be edited; {OPENAI_CONVENTION}", "invalid_mask"
        )
    return alpha.point(lambda a: 255 if a == 0 else 0)


@dataclass
class EditInputs:
    """An edit's decoded inputs: the image (RGB) and the mask in the engine's convention (L, white repaints)."""

    image: Any
    mask: Any = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _read(
    image: bytes, mask: bytes | None, convention: MaskConvention, max_side: int, names: tuple[str, str]
) -> EditInputs:
    decoded = open_image(image, names[0], max_side)
    inputs = EditInputs(decoded.convert("RGB"))
    if mask is not None:
        raw = open_image(mask, names[1], max_side)
        if raw.size != decoded.size:
            raise _bad(
                names[1],
                f"is {raw.size[0]}x{raw.size[1]} and the image {decoded.size[0]}x{decoded.size[1]}: "
                "they must be the same size",
                "invalid_value",
            )
        inputs.mask = openai_mask(raw, names[1]) if convention == "openai" else native_mask(raw, names[1])
    return inputs


async def read_inputs(
    image: bytes,
    mask: bytes | None,
    convention: MaskConvention,
    max_side: int,
    names: tuple[str, str] = ("image", "mask"),
) -> EditInputs:
    """Decode and check an edit's image and mask (``names``: their params in this API), in a thread."""
    return await asyncio.to_thread(_read, image, mask, convention, max_side, names)


def resized(inputs: EditInputs, width: int, height: int) -> EditInputs:
    """The inputs at ``width`` x ``height``, resized as diffusers' image processor does (Lanczos; the mask after
    its conversion to grey, as the inpainting pipeline's mask processor does): the engine's own resize is then a
    no-op, and a queued request holds an image of the size it generates, not the upload's."""
    from PIL import Image

    size = (width, height)
    if inputs.size == size:
        return inputs
    mask = None if inputs.mask is None else inputs.mask.resize(size, Image.Resampling.LANCZOS)
    return EditInputs(inputs.image.resize(size, Image.Resampling.LANCZOS), mask)
