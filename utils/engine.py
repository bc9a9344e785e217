"""Admission and execution: slots, a bounded FIFO queue, deadlines and cancellation.

Why not one thread per request (the reference)? Requests on one device share its compute: N requests running at
once each take about N times as long, so a burst all finishes near the end (mean latency ~ N x S). Running at
most ``max_concurrency`` at once, first come first served, gives the same throughput with a mean latency of about
(N + 1) / 2 x S, and bounds memory. Beyond the slots, up to ``max_queue`` requests wait; beyond that the answer is
an immediate overload error, before any work is done.

A request that times out or whose client went away is stopped at its next denoising step (the step callback raises
``GenerationCancelled`` in the worker thread); a queued one never runs. Its slot is released when the worker thread
has really stopped, so ``active`` always counts threads that are computing.

Execution sits behind one seam, the runner a slot thread calls: ``threads_runner.pipeline_runner`` (the threads
strategy: a whole pipeline call per slot) or ``step_engine.StepRunner`` (the step strategy: the slot thread encodes,
hands the request to the one shared denoising loop, waits, then decodes). Admission does not know which one it runs.

Progress: ``submit(..., progress=callback)`` reports what happens to one request as events (``ProgressEvent``),
always called on the event loop thread: ``queued`` (with the 1-based queue position, again whenever it moves),
``started`` (a slot was taken), then one ``step`` per denoising step (steps done, total, seconds since start), with
preview images of the current latents every ``request.preview_every`` steps when the engine has a ``previewer``.
Jobs, streamed answers and progress bars are built on these events; the engine itself knows no HTTP.

All bookkeeping (``_active``, ``_waiters``, counters) is touched only from the event loop thread, so it needs no
lock; worker threads report back through ``loop.call_soon_threadsafe`` (via ``asyncio.wrap_future``).

Observers (metrics) sit on one seam too: every ``submit`` ends by calling each of ``Engine.listeners`` with the request
and its outcome (the ``GenerationResult``, or the exception it raised), on the event loop thread. Every generation
passes there, whichever API or path (synchronous, streamed, jobs) it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

# The engine's vocabulary lives in engine_types; re-exported here, where callers have always imported it from.
from .engine_types import (
    ClientGone,
    EngineError,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    GenerationTimeout,
    Listener,
    NotReady,
    OutOfMemory,
    Overloaded,
    Previewer,
    Progress,
    ProgressEvent,
    Runner,
    StepCallback,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ClientGone",
    "Engine",
    "EngineError",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "GenerationTimeout",
    "Listener",
    "NotReady",
    "OutOfMemory",
    "Overloaded",
    "Previewer",
    "Progress",
    "ProgressEvent",
    "Runner",
    "StepCallback",
    "is_oom",
    "release_memory",
]


@dataclass
class _Job:
    request: GenerationRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    first_step_at: float | None = None
    started_at: float | None = None
    progress: Progress | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def report(self, event: ProgressEvent) -> None:
        """From a worker thread: hand ``event`` to the progress callback on the event loop."""
        if self.progress is not None and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
                self.loop.call_soon_threadsafe(self.progress, event)


def _notify(progress: Progress, event: ProgressEvent) -> None:
    """Call a progress callback on the event loop; its failure is logged, never the engine's."""
    try:
        progress(event)
    except Exception:  # noqa: BLE001 - a listener's bug must not break admission
        logger.exception("progress callback failed")


Submit = Callable[..., Awaitable[GenerationResult]]


def _tell_listeners(submit: Submit) -> Submit:
    """Wraps ``Engine.submit``: its outcome, the result or the exception it raises, goes to every listener."""

    @functools.wraps(submit)
    async def submit_and_tell(self: Engine, request: GenerationRequest, *args: Any, **kwargs: Any) -> GenerationResult:
        try:
            result = await submit(self, request, *args, **kwargs)
        except BaseException as exc:
            self._tell(request, exc)
            raise
        self._tell(request, result)
        return result

    return submit_and_tell


def is_oom(exc: BaseException) -> bool:
    """True for the out-of-memory errors of the host and of CUDA."""
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))


def release_memory() -> None:
    """Return the accelerator's cached blocks to the device (nothing to do on a CPU).

    No ``gc.collect()`` here: tensors are freed by reference counting, and a full collection with a pipeline loaded
    takes ~0.2 s holding the GIL, which delayed every response on a CPU server (bench/RESULTS.md). Only an
    out-of-memory failure collects first.
    """
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


class Engine:
    """Runs ``runner(request, on_step)`` in worker threads under admission control.

    ``runner`` must call ``on_step(step_index, latents)`` after every denoising step; that call raises
    ``GenerationCancelled`` when the request was abandoned. ``previewer`` turns latents into preview images.
    """

    def __init__(
        self,
        runner: Runner,
        max_concurrency: int = 1,
        max_queue: int = 32,
        request_timeout: float = 0,
        release: Callable[[], None] = release_memory,
        cpu_threads: int | None = None,
        kind: str = "threads",
        previewer: Previewer | None = None,
    ) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.runner = runner
        self.kind = kind  # the execution strategy behind the runner: "threads" or "step" (for /api/status and logs)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.release = release
        self.previewer = previewer
        # CPU only: the cores split evenly between the slots (None: leave torch's setting alone). The split is fixed,
        # never adjusted to the load: a different thread count changes the floating-point reductions, and the same
        # seed must give the same image alone or under load.
        self.cpu_threads = cpu_threads
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="generate", initializer=self._init_worker
        )
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._positions: dict[asyncio.Future[None], Progress] = {}  # waiters that asked for progress
        # Held while idle-time memory is released. A generation passes through it before starting, and a release
        # only runs if no slot is taken once it holds it, so a release never overlaps (and stalls) a generation.
        self._memory_lock = threading.Lock()
        # Set when the shutdown timeout ends the drain: every waiting request is answered NotReady("draining").
        self._aborted = asyncio.Event()
        self.ready_reason: str | None = "loading"  # None when ready
        # See the module's notes; a listener must be quick (it runs on the event loop).
        self.listeners: list[Listener] = []
        self.stats = dict.fromkeys(
            ("total", "completed", "rejected", "timed_out", "disconnected", "cancelled", "failed", "out_of_memory"), 0
        )

    def _init_worker(self) -> None:
        # OpenMP's thread count belongs to the calling thread, so each worker sets its own share. More OpenMP
        # threads than cores make every barrier wait on a descheduled thread (bench/RESULTS.md).
        if self.cpu_threads:
            torch.set_num_threads(max(1, self.cpu_threads // self.max_concurrency))

    # -- state ------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Slots in use: generations running now (including ones stopping after a cancel)."""
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def set_ready(self) -> None:
        self.ready_reason = None

    def start_draining(self) -> None:
        self.ready_reason = "draining"

    # -- admission --------------------------------------------------------------------------------------

    async def _acquire(self, job: _Job, gone: asyncio.Event, deadline: float | None) -> None:
        if self._active < self.max_concurrency and not self._waiters:
            self._active += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if job.progress is not None:
            self._positions[waiter] = job.progress
            _notify(job.progress, ProgressEvent("queued", position=len(self._waiters)))
        try:
            await self._race(waiter, gone, deadline)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # the slot was handed to us as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self._announce_positions()
            raise
        finally:
            self._positions.pop(waiter, None)

    def _announce_positions(self) -> None:
        """Tell every waiter that asked for progress its new place in the queue (the queue moved)."""
        if not self._positions:
            return
        position = 0
        for waiter in self._waiters:
            if waiter.done():
                continue
            position += 1
            progress = self._positions.get(waiter)
            if progress is not None:
                _notify(progress, ProgressEvent("queued", position=position))

    def _thread_done(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            # Retrieve it: after a timeout or a disconnect nobody awaits this future, and asyncio would log
            # "exception was never retrieved" for every abandoned request.
            future.exception()
        self._release_slot()

    def _release_slot(self) -> None:
        self._active -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._active += 1
                waiter.set_result(None)
                self._announce_positions()
                return
        if self._active == 0:
            # Idle: a good moment to return cached memory, as it can't stall a running request.
            self._executor.submit(self._release_if_idle)

    def _release_if_idle(self) -> None:
        with self._memory_lock:
            # Read from a worker thread: a slot taken since we were submitted means work is waiting; skip.
            if self._active != 0:
                return
            try:
                self.release()
            except Exception:  # noqa: BLE001 - clean-up must never take the engine down
                logger.exception("memory release failed")

    async def _race(self, main: asyncio.Future[Any], gone: asyncio.Event, deadline: float | None) -> Any:
        """Wait for ``main``; raise ClientGone, NotReady or GenerationTimeout if the client leaves, the shutdown
        timeout ends the drain, or time runs out."""
        gone_waiter = asyncio.ensure_future(gone.wait())
        abort_waiter = asyncio.ensure_future(self._aborted.wait())
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait({main, gone_waiter, abort_waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone_waiter.cancel()
            abort_waiter.cancel()
        if main.done():
            return main.result()
        if gone.is_set():
            raise ClientGone
        if self._aborted.is_set():
            raise NotReady("draining")
        raise GenerationTimeout

    # -- execution --------------------------------------------------------------------------------------

    def _tell(self, request: GenerationRequest, outcome: GenerationResult | BaseException) -> None:
        for listener in self.listeners:
            try:
                listener(request, outcome)
            except Exception:  # noqa: BLE001 - an observer must never change a request's answer
                logger.exception("engine listener failed")

    @_tell_listeners
    async def submit(
        self, request: GenerationRequest, gone: asyncio.Event | None = None, progress: Progress | None = None
    ) -> GenerationResult:
        """Admit, run and return one generation; raise an ``EngineError`` for every expected failure.

        ``gone`` set: stop (the client left, or, when ``gone.cancelled`` is true, a job was cancelled).
        ``progress``: see the module docstring.
        """
        self.stats["total"] += 1
        if self.ready_reason is not None:
            self.stats["rejected"] += 1
            raise NotReady(self.ready_reason)
        job = _Job(request, progress=progress, loop=asyncio.get_running_loop())
        gone = gone if gone is not None else asyncio.Event()
        deadline = job.arrived + self.request_timeout if self.request_timeout > 0 else None
        try:
            try:
                await self._acquire(job, gone, deadline)
            except Overloaded:
                self.stats["rejected"] += 1
                raise
            admitted = time.monotonic()
            future = asyncio.wrap_future(self._executor.submit(self._run, job))
            # The slot is released when the thread is done, not when we stop waiting for it.
            future.add_done_callback(self._thread_done)
            try:
                images = await self._race(future, gone, deadline)
            except BaseException:
                job.cancel.set()  # whatever stopped us waiting, nobody wants this result any more
                raise
        except ClientGone:
            # A ``gone`` that says it is a cancel (a job's DELETE) is not a client that left.
            self.stats["cancelled" if getattr(gone, "cancelled", False) else "disconnected"] += 1
            raise
        except GenerationTimeout:
            self.stats["timed_out"] += 1
            raise
        except OutOfMemory:
            self.stats["out_of_memory"] += 1
            raise
        except Overloaded:
            raise  # counted as rejected above; not a failure as well
        except NotReady:
            self.stats["rejected"] += 1  # stopped by the end of a drain
            raise
        except Exception:
            self.stats["failed"] += 1
            raise
        self.stats["completed"] += 1
        done = time.monotonic()
        first = None if job.first_step_at is None else job.first_step_at - job.arrived
        return GenerationResult(
            images, request.seed, queued_s=admitted - job.arrived, first_step_s=first, generate_s=done - admitted
        )

    def _run(self, job: _Job) -> list[Any]:
        """Worker thread: run the pipeline unless the request was abandoned while queued."""
        with self._memory_lock:
            pass  # wait for an idle-time memory release that began before this slot was taken
        if job.cancel.is_set():
            raise GenerationCancelled
        job.started_at = time.monotonic()
        job.report(ProgressEvent("started"))
        total = job.request.num_inference_steps

        def on_step(step: int, latents: Any = None) -> None:
            now = time.monotonic()
            if job.first_step_at is None:
                job.first_step_at = now
            if job.cancel.is_set():
                raise GenerationCancelled
            if job.progress is not None:
                event = ProgressEvent("step", step=step + 1, total=total, elapsed_s=now - job.started_at)
                event.previews = self._previews(job.request, step + 1, latents)
                job.report(event)

        try:
            return self.runner(job.request, on_step)
        except BaseException as exc:
            if not is_oom(exc):
                raise
        # Freed outside the except block: until it ends, the traceback keeps the failed request's tensors alive.
        logger.error("out of memory in request %s; freeing caches", job.request.request_id)
        try:
            gc.collect()  # reference cycles from the failed call may hold tensors
            self.release()  # the configured release (release_memory by default)
        except Exception:  # noqa: BLE001 - the OOM answer matters more than a failed clean-up
            logger.exception("memory release failed")
        raise OutOfMemory

    def _previews(self, request: GenerationRequest, done: int, latents: Any) -> list[Any] | None:
        """Preview images when one is due after ``done`` steps (never after the last: the image itself follows)."""
        every = request.preview_every
        if not every or self.previewer is None or latents is None:
            return None
        if done % every or done >= request.num_inference_steps:
            return None
        try:
            return self.previewer(latents)
        except Exception:  # noqa: BLE001 - a failed preview must not fail the generation
            logger.exception("preview failed in request %s", request.request_id)
            return None

    def abort(self) -> None:
        """End a drain: every running and queued request is answered ``NotReady("draining")`` now, and running
        generations stop at their next step. Call from the event loop."""
        self.start_draining()
        if not self._aborted.is_set() and (self._active or self._waiters):
            logger.warning("drain ended: stopping %d running and %d queued request(s)", self._active, self.queued)
        self._aborted.set()

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (self._active or self._waiters) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not (self._active or self._waiters)

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait up to ``timeout`` s for running and queued requests; True if all finished.
        Requests still there then are aborted, and their threads get as long again to stop."""
        self.start_draining()
        if await self._wait_idle(timeout):
            return True
        self.abort()
        await self._wait_idle(timeout)
        return False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        close_runner = getattr(self.runner, "close", None)
        if callable(close_runner):
            close_runner()  # the step strategy's loop and encoder threads
