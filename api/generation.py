"""One generation, whichever API it came from: limits and defaults, the engine, errors, images out.

Both APIs map their bodies to one ``GenerationRequest`` (``to_generation``), run it (``run_generation``, which turns
the engine's failures into envelopes), and store or encode the images the same way.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request

from api.adapters import adapter_error, loras_of
from api.deps import ready_engine, request_id, watch_disconnect
from api.errors import APIError, internal_error
from api.limits import limit_messages, max_side
from api.models import model_error, model_of

if TYPE_CHECKING:
    from engine import EngineError, GenerationRequest, GenerationResult, Progress
    from utils.image_store import Encoding

# The engine (torch) is imported inside the functions: importing the HTTP layer loads nothing heavy.

logger = logging.getLogger(__name__)

__all__ = [
    "as_api_error",
    "encode_all",
    "encoding_of",
    "is_blank",
    "job_failure",
    "log_generation",
    "run_generation",
    "save_all",
    "steps_run",
    "timing_headers",
    "to_generation",
]


# Characters that show nothing: spaces and separators (Z*), controls (Cc) and format characters (Cf: zero-width
# space and joiners, BOM, bidi marks). A prompt made only of these is blank, whatever str.strip() says.
_INVISIBLE = ("Zs", "Zl", "Zp", "Cc", "Cf")


def is_blank(text: str) -> bool:
    """Whether ``text`` has no visible character."""
    return all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text)


def to_generation(
    request: Request,
    body: Any,
    names: dict[str, str],
    *,
    n: int,
    height: int | None,
    width: int | None,
    blank_prompt: bool = False,
) -> GenerationRequest:
    """Check the configured limits and resolve defaults; ``names`` maps our names to the API's params.

    ``body`` is either API's schema: the fields both share (prompt, negative_prompt, num_inference_steps, seed,
    guidance_scale) are read from it; the image count and size, named differently by each API, come as arguments.
    ``blank_prompt``: an empty prompt is what the request means (a variation, from its image alone).
    """
    from engine import GenerationRequest

    settings, model = request.app.state.settings, model_of(request)
    geometry = model.geometry
    limits = limit_messages(settings, geometry)
    prompt, negative_prompt, steps = body.prompt, body.negative_prompt, body.num_inference_steps

    def bad(field: str, message: str) -> APIError:
        return APIError(
            400, f"{names.get(field, field)}: {message}", param=names.get(field, field), code="invalid_value"
        )

    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
        if len(text) > settings.max_prompt_chars:
            raise bad(field, limits[field])
    if is_blank(prompt) and not blank_prompt:
        raise bad("prompt", "must not be blank")
    steps = settings.default_steps if steps is None else steps
    if steps > settings.max_steps:
        raise bad("steps", limits["num_inference_steps"])
    if n > settings.max_images_per_request:
        raise bad("n", limits[names.get("n", "n")])
    height = geometry.default_size if height is None else height
    width = geometry.default_size if width is None else width
    for field, value in (("height", height), ("width", width)):
        message = _size_problem(value, max_side(settings, geometry), geometry.size_multiple, limits[field])
        if message:
            raise bad(field, message)
    if problem := _over_budget(request.app.state.engine, model, n, width, height, body.guidance_scale):
        raise bad("n", problem)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        num_images=n,
        seed=secrets.randbits(32) if body.seed is None else body.seed,
        # The value used, so the answer reports it: the pipeline's own default when the request gave none.
        guidance_scale=model.default_guidance if body.guidance_scale is None else body.guidance_scale,
        height=height,
        width=width,
        request_id=request_id(request),
        loras=loras_of(request, body),
        model=model.name if request.app.state.models.several else "",  # one model: "" (answers as before)
    )


def steps_run(generation: GenerationRequest) -> int:
    """The denoising steps ``generation`` runs: all of them, or the part an edit's strength leaves."""
    from engine.tasks import get_task

    return get_task(generation.task).steps(generation)


def _size_problem(value: int, max_size: int, multiple: int, limit: str) -> str | None:
    """What is wrong with a width or height (None: nothing), with the nearest sizes that would do."""
    if not 16 <= value <= max_size:
        return limit
    if value % multiple:
        lower = max(multiple, value - value % multiple)
        options = " or ".join(str(v) for v in (lower, lower + multiple) if v <= max_size)
        return f"must be a multiple of {multiple}; try {options}"
    return None


def _over_budget(engine: Any, model: Any, n: int, width: int, height: int, guidance: float | None) -> str | None:
    """Why the engine could never run these images at once (None: it could): its pixel budget, the model's memory
    budget."""
    budget = getattr(engine, "max_pixels", 0)
    if budget and n * width * height > budget:
        return _too_large(n, width, height, budget)
    memory = model.memory
    return memory.refusal(width, height, n, guidance is None or guidance > 1) if memory is not None else None


def _too_large(n: int, width: int, height: int, budget: int) -> str:
    return (
        f"{n} image(s) of {width}x{height} are {n * width * height} pixels, more than this server generates at once "
        f"({budget}, --max-pixels-in-flight); ask for fewer images or a smaller size"
    )


async def run_generation(
    request: Request,
    generation: GenerationRequest,
    progress: Progress | None = None,
    gone: asyncio.Event | None = None,
) -> GenerationResult:
    """Submit to the engine, stopping the generation if the client leaves; engine failures become envelopes.

    ``progress``: the engine's progress callback. ``gone``: an event the caller may set to stop the generation as a
    client disconnect does (a streamed answer whose body was abandoned)."""
    from engine import ClientGone, GenerationTimeout, ModelUnavailable, NotReady, OutOfMemory, Overloaded
    from engine.adapters import ERRORS as ADAPTER_ERRORS

    engine = ready_engine(request)
    gone, watcher = watch_disconnect(request, gone)
    log_generation(generation)
    try:
        result = await engine.submit(generation, gone, progress)
        if gone.is_set():
            # The client left as its generation finished: saving the images would leave files nobody can name.
            raise ClientGone
        return result
    except (Overloaded, NotReady, GenerationTimeout, OutOfMemory, ClientGone, ModelUnavailable, *ADAPTER_ERRORS) as exc:
        if isinstance(exc, ClientGone):
            logger.info("request %s: client disconnected, generation stopped", generation.request_id)
        raise as_api_error(exc, engine, request.app.state.settings.request_timeout) from None
    finally:
        watcher.cancel()


def log_generation(generation: GenerationRequest) -> None:
    """One log line for a generation as it is submitted (the prompt truncated)."""
    logger.info("request %s: %s", generation.request_id, generation.summary())


def as_api_error(exc: EngineError, engine: Any, request_timeout: float) -> APIError:
    from engine import (
        GenerationTimeout,
        MemoryWait,
        ModelUnavailable,
        NotReady,
        OutOfMemory,
        Overloaded,
        TooLarge,
        TooLargeForMemory,
    )

    adapters = adapter_error(exc)
    if adapters is not None:
        return adapters
    if isinstance(exc, ModelUnavailable):
        return model_error(exc.model, exc.reason, exc.message)
    if isinstance(exc, TooLargeForMemory):  # as for TooLarge: the edits' routes meet it here
        return APIError(400, f"Too large: {exc.message}.", "invalid_request_error", code="invalid_value")
    if isinstance(exc, MemoryWait):
        return APIError(
            503,
            f"The memory this request needs is taken by the requests running now ({exc}). Retry later.",
            "overloaded_error",
            code="memory_wait",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, TooLarge):  # the API checks this first (to_generation); here for any other caller
        return APIError(400, f"Too large: {exc}.", "invalid_request_error", code="invalid_value")
    if isinstance(exc, Overloaded):
        return APIError(
            503,
            f"The server is busy: {engine.active} generating and {engine.queued} waiting. Retry later.",
            "overloaded_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, NotReady):
        return APIError(
            503, f"The server is {exc.reason}.", "unavailable", code=exc.reason, headers={"Retry-After": "5"}
        )
    if isinstance(exc, GenerationTimeout):
        return APIError(
            504, f"The request took longer than {request_timeout:g}s and was stopped.", "timeout_error", code="timeout"
        )
    if isinstance(exc, OutOfMemory):
        return APIError(
            503,
            "The server ran out of memory for this request; try a smaller size or fewer images, or retry later.",
            "out_of_memory",
            code="out_of_memory",
            headers={"Retry-After": "5"},
        )
    # ClientGone. Nobody is listening; this answer is for the log (499: client closed request, nginx's convention).
    return APIError(499, "Client closed the request.", "client_closed", code="client_closed")


def job_failure(request_timeout: float) -> Callable[[BaseException, Any, Any], APIError]:
    """How a job's failed run is described to its clients (``jobs.errors.FailureOf``): the engine's failures as a
    request's would be answered, anything else as an internal error with the request id (the job service logs it)."""

    def failure_of(exc: BaseException, generation: GenerationRequest, engine: Any) -> APIError:
        from engine import EngineError

        if isinstance(exc, EngineError):
            return as_api_error(exc, engine, request_timeout)
        return internal_error(generation.request_id)

    return failure_of


def timing_headers(result: GenerationResult) -> dict[str, str]:
    """``Server-Timing`` (queue, first step, generate) and ``X-Seed``."""
    parts = [f"queue;dur={result.queued_s * 1000:.1f}", f"generate;dur={result.generate_s * 1000:.1f}"]
    if result.first_step_s is not None:
        parts.append(f"first_step;dur={result.first_step_s * 1000:.1f}")
    return {"Server-Timing": ", ".join(parts), "X-Seed": str(result.seed)}


def encoding_of(body: Any) -> Encoding:
    """The ``output_format`` and ``output_compression`` of a request body (``api.schemas.OutputOptions``), defaults
    resolved."""
    from utils.image_store import DEFAULT_COMPRESSION, Encoding

    compression = DEFAULT_COMPRESSION if body.output_compression is None else body.output_compression
    return Encoding(body.output_format or "png", compression)


async def encode_all(images: list[Any], encoding: Encoding) -> list[bytes]:
    """The images encoded, in threads: encoding a large image takes 10 to 250 ms, never on the event loop."""
    return await asyncio.gather(*(asyncio.to_thread(encoding.encode, im) for im in images))


async def save_all(store: Any, images: list[Any], encoding: Encoding | None = None) -> list[str]:
    """Encode (default: PNG) and store the images; return their names."""
    from utils.image_store import Encoding

    encoding = encoding or Encoding()
    # Encoding and disk writes run off the generation slots, so the next request can already denoise.
    return await asyncio.gather(
        *(asyncio.to_thread(lambda im=im: store.save(encoding.encode(im), encoding.extension)) for im in images)
    )
