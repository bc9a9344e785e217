"""OpenAI's streamed image generation: ``"stream": true`` on POST /v1/images/generations.

The answer is Server-Sent Events in the shape the ``openai`` package parses (its ``ImageGenStreamEvent``): up to
``partial_images`` ``image_generation.partial_image`` events per image while the request denoises, then one
``image_generation.completed`` event per image. Each event's ``event:`` name is its ``type``. An edit
(``POST /v1/images/edits``) streams the same events under OpenAI's names for edits, ``image_edit.partial_image`` and
``image_edit.completed`` (``EDIT_EVENTS``).

- **Partial images** are the engine's previews of the current latents (``engine/previews.py``: a linear projection
  fitted to the VAE, at 1/8 of the side), spread evenly over the steps (``preview_interval``) and never after the
  last step, so no partial follows a completed image. Each is upscaled to the requested size before encoding
  (``upscale``), so that a partial has the ``size`` its event reports and a client can draw it where the final
  image will go; the cost per partial image is in bench/RESULTS.md, "Streamed previews".
- **n > 1**: the images denoise together, so each preview round yields one partial per image, sent in image order;
  ``partial_image_index`` counts the partials of one image (0 .. partial_images - 1, as OpenAI defines it), and the
  completed events come in image order too. The event shape has no image index: the order is the contract.
- **Errors.** Anything refused before the generation starts (validation, a full queue, not ready) is an ordinary
  JSON envelope with its status code: the stream only starts once the request is queued or running. A failure
  after that (deadline, out of memory, drain, a failing pipeline) is one ``error`` event whose data carries the
  envelope (``{"type": "error", "error": {...}}``); the ``openai`` client raises ``openai.APIError`` on it.
- **The client leaving** mid-stream stops the generation at its next step, as for a plain request.
- ``response_format`` is ignored when streaming: OpenAI's stream carries only ``b64_json``, and no file is saved.
- ``usage`` is required by the completed event's type; this server counts no tokens, so every count is 0.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from api.deps import request_id
from api.errors import APIError, envelope, internal_error
from api.generation import run_generation, steps_run
from api.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event

if TYPE_CHECKING:
    from engine import GenerationRequest, GenerationResult, ProgressEvent
    from utils.image_store import Encoding

logger = logging.getLogger(__name__)

__all__ = ["EDIT_EVENTS", "encode_for_stream", "preview_interval", "stream_generation", "upscale"]

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
# The same events of an edit (POST /v1/images/edits), as OpenAI names them (ImageEditStreamEvent).
EDIT_EVENTS = ("image_edit.partial_image", "image_edit.completed")
# Required by ImageGenCompletedEvent; a diffusion model has no tokens to bill (see the module docstring).
NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


@dataclass(frozen=True)
class EventFields:
    """What every image event repeats about the request."""

    size: str  # "WIDTHxHEIGHT", as generated
    output_format: str = "png"  # the request's output_format: partial and completed images alike
    quality: str = "auto"  # the request's quality is not a setting here: the steps are
    background: str = "opaque"  # SD3 images have no alpha channel


def preview_interval(steps: int, partial_images: int) -> int:
    """Steps between previews: ``partial_images`` of them before the last step, evenly spread where possible.

    E.g. 28 steps and 2 partials: after steps 10 and 20. The engine previews every N steps, so a few short runs
    get a tighter spacing and a preview more than asked for, which the stream drops (9 steps, 3 partials: after 2,
    4 and 6). With fewer steps than partials + 1 there are fewer partials (OpenAI allows that); 0 partials, none.
    """
    if partial_images <= 0 or steps <= 1:
        return 0
    every = -(-steps // (partial_images + 1))  # ceil: at most partial_images multiples fall before the last step
    if (steps - 1) // every < partial_images:
        every = max(1, (steps - 1) // partial_images)  # enough of them, as long as there are enough steps
    return every


def upscale(image: Any, size: tuple[int, int]) -> Any:
    """``image`` at ``size`` (width, height): a preview's pixels repeated (nearest neighbour).

    Nearest, not bilinear: the partial keeps exactly the detail the preview has, and its PNG stays small (runs of
    equal pixels): at 1024x1024, 90 KB and 14 ms to encode against 1.7 MB and 70 ms for a bilinear upscale
    (bench/RESULTS.md, "Streamed previews"). A client may smooth it when drawing it."""
    from PIL import Image

    return image if image.size == size else image.convert("RGB").resize(size, Image.Resampling.NEAREST)


def encode_for_stream(image: Any, size: tuple[int, int], encoding: Encoding | None = None) -> str:
    """One image as an event carries it: at ``size`` (previews are upscaled), encoded (default PNG), base64."""
    from utils.image_store import Encoding

    return base64.b64encode((encoding or Encoding()).encode(upscale(image, size))).decode()


async def stream_generation(
    request: Request,
    generation: GenerationRequest,
    partial_images: int,
    encoding: Encoding | None = None,
    names: tuple[str, str] = (PARTIAL, COMPLETED),
) -> StreamingResponse:
    """Start ``generation`` and answer its events; raise (an envelope) if it fails before it is queued or running.

    Partial and completed images are encoded as ``encoding`` says (the request's output_format; default PNG);
    ``names``: the partial and completed events' type (a generation's, or ``EDIT_EVENTS``)."""
    from utils.image_store import Encoding

    encoding = encoding or Encoding()
    generation.preview_every = preview_interval(steps_run(generation), partial_images)
    previews: asyncio.Queue[list[Any]] = asyncio.Queue()
    began = asyncio.Event()  # the first progress event: the request was admitted (queued or running)

    def progress(event: ProgressEvent) -> None:
        began.set()
        if event.previews:
            previews.put_nowait(event.previews)

    stop = asyncio.Event()  # set when the stream's body is abandoned: the generation stops at its next step
    task = asyncio.create_task(run_generation(request, generation, progress, stop))
    task.add_done_callback(_retrieve)
    began_waiter = asyncio.ensure_future(began.wait())
    try:
        await asyncio.wait({task, began_waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        stop.set()
        raise
    finally:
        began_waiter.cancel()
    if task.done() and not began.is_set():
        task.result()  # refused before it started (overloaded, not ready, ...): an ordinary envelope
    size = (generation.width, generation.height)
    body = _events(task, previews, stop, partial_images, size, encoding, request_id(request), names)
    headers = {**SSE_HEADERS, "X-Seed": str(generation.seed)}
    return StreamingResponse(body, media_type=SSE_MEDIA_TYPE, headers=headers)


async def _events(
    task: asyncio.Task[GenerationResult],
    previews: asyncio.Queue[list[Any]],
    stop: asyncio.Event,
    partial_images: int,
    size: tuple[int, int],
    encoding: Encoding,
    rid: str,
    names: tuple[str, str] = (PARTIAL, COMPLETED),
) -> AsyncIterator[bytes]:
    """The stream's body: partial images as they come, then the images, or one error event."""
    fields = EventFields(size=f"{size[0]}x{size[1]}", output_format=encoding.format)
    sent = 0
    try:
        while (images := await _next_previews(task, previews)) is not None:
            if sent >= partial_images:
                continue  # never more than asked for, whatever the engine sends
            for b64 in await _encode(images, size, encoding):
                yield image_event(names[0], fields, b64, partial_image_index=sent)
            sent += 1
        try:
            result = task.result()
        except APIError as exc:
            if exc.status != 499:  # 499: the client left; nobody to tell
                yield error_event(exc)
            return
        except Exception:  # noqa: BLE001 - answered as the sync path's 500 is, details only in the log
            logger.exception("request %s failed while streaming", rid)
            yield error_event(internal_error(rid))
            return
        for b64 in await _encode(result.images, size, encoding):
            yield image_event(names[1], fields, b64, usage=NO_USAGE)
    finally:
        # Reached early only when the body is abandoned (the client left, the send timed out, shutdown).
        stop.set()


async def _next_previews(task: asyncio.Task[Any], previews: asyncio.Queue[list[Any]]) -> list[Any] | None:
    """The next round of previews, or None once the generation is over and every round was taken."""
    if previews.empty() and not task.done():
        getter = asyncio.ensure_future(previews.get())
        try:
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()  # an item it was woken for stays in the queue (asyncio.Queue.get's contract)
        if getter.done() and not getter.cancelled():
            return getter.result()
    return None if previews.empty() else previews.get_nowait()


async def _encode(images: list[Any], size: tuple[int, int], encoding: Encoding) -> list[str]:
    # Off the event loop: a 1024x1024 PNG takes tens of milliseconds.
    return await asyncio.gather(*(asyncio.to_thread(encode_for_stream, image, size, encoding) for image in images))


def image_event(kind: str, fields: EventFields, b64: str, **extra: Any) -> bytes:
    """A partial or completed image event, as ``ImageGenPartialImageEvent`` / ``ImageGenCompletedEvent``."""
    data = {"type": kind, "b64_json": b64, "created_at": int(time.time()), **asdict(fields), **extra}
    return sse_event(data, event=kind)


def error_event(error: APIError) -> bytes:
    """A failure after the stream started: the envelope under ``error`` (what the openai client raises on)."""
    return sse_event({"type": "error", **envelope(error.message, error.type, error.param, error.code)}, event="error")


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Nobody awaits a generation whose stream was abandoned; retrieving its outcome keeps asyncio from logging
    # "exception was never retrieved" for it.
    if not task.cancelled():
        task.exception()
