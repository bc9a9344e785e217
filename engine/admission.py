"""Admission and execution: slots, a bounded FIFO queue, deadlines and cancellation.

Why not one thread per request (the reference)? Requests on one device share its compute: N requests running at
once each take about N times as long, so a burst all finishes near the end (mean latency ~ N x S). Running at
most ``max_concurrency`` at once, first come first served, gives the same throughput with a mean latency of about
(N + 1) / 2 x S, and bounds memory. Beyond the slots, up to ``max_queue`` requests wait; beyond that the answer is
an immediate overload error, before any work is done.

Several models (``models``, an ``engine.served.ModelSource``): each request runs on its own model's runner, which the
source holds resident while it runs (``engine.served``); the slots and the queue are shared fairly between the
models (``engine.fair_queue``: a free slot goes to the model running fewest, a full queue sheds the longest model's
newest waiter). With one model, all of this is the FIFO described above.

Cost as well as count: with a pixel budget (``max_pixels``), the requests running hold at most that many pixels
(width x height x images, what their memory grows with). A request waits in the FIFO queue until a slot and its
pixels are free, the head holding the ones behind it (a large request is never starved by small ones); one larger
than the whole budget is refused at once (``TooLarge``). Measured memory, with ``memory``: ``engine.memory_gate``.

A request that times out or whose client went away is stopped at its next denoising step (the step callback raises
``GenerationCancelled``); a queued one never runs. Its slot is released when the worker thread has really stopped.

Execution sits behind one seam, the runner a slot thread calls: ``engine.threads.pipeline_runner`` or
``engine.step.StepRunner``; admission knows neither, nor they which task (``engine.tasks``). A request's LoRA
adapters are loaded (``engine.adapters``) before it takes a slot.

Progress: ``submit(..., progress=callback)`` reports what happens to one request as events (``ProgressEvent``),
always called on the event loop thread: ``queued`` (with the 1-based queue position, again whenever it moves),
``started`` (a slot was taken), then one ``step`` per denoising step (steps done, total, seconds since start), with
preview images of the current latents every ``request.preview_every`` steps when the engine has a ``previewer``.
Jobs, streamed answers and progress bars are built on these events; the engine itself knows no HTTP.

All bookkeeping (``_active``, ``_waiters``, counters) is touched only from the event loop thread: it needs no lock.

Observers (metrics): every ``submit`` ends by calling each of ``Engine.listeners`` with the request and its outcome
(the ``GenerationResult`` or the exception), on the event loop thread, whichever API or path it came from.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .adapters import AdapterPool
from .fair_queue import FairQueue, FairShare
from .memory import is_oom, release_memory
from .memory_admission import MemoryAdmission
from .memory_gate import MemoryGate
from .progress import Ticket, counter_of, tell_listeners
from .served import Holds, ModelSource, Served
from .types import (
    ClientGone,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    GenerationTimeout,
    Listener,
    NotReady,
    OutOfMemory,
    Previewer,
    Progress,
    ProgressEvent,
    Runner,
)

logger = logging.getLogger(__name__)

__all__ = ["Engine"]


class Engine(FairShare, Holds, MemoryGate):
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
        log_interval: float = 0,
        max_pixels: int = 0,
        adapters: AdapterPool | None = None,
        memory: MemoryAdmission | None = None,
        models: ModelSource | None = None,
    ) -> None:
        if max_concurrency < 1 or max_queue < 0 or max_pixels < 0:
            raise ValueError("max_concurrency must be >= 1, max_queue and max_pixels >= 0")
        self.runner = runner
        self.kind = kind  # the execution strategy behind the runner: "threads" or "step" (for /api/status and logs)
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.release = release
        self.previewer = previewer
        self.log_interval = log_interval  # seconds between a running generation's progress log lines (0: none)
        # CPU only: the cores split evenly between the slots (None: leave torch's setting alone). The split is fixed,
        # never adjusted to the load: a different thread count changes the floating-point reductions, and the same
        # seed must give the same image alone or under load.
        self.cpu_threads = cpu_threads
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="generate", initializer=self._init_worker
        )
        self.max_pixels = max_pixels  # pixels running at once (0: no budget, slots alone)
        self.adapters = adapters  # an AdapterPool: a request's LoRA adapters are loaded before it takes a slot
        self.memory = memory  # admission by measured memory (None: slots and pixels only)
        # Several models: each request's runner, previewer, adapters and memory admission come from here (None: the
        # engine's one model, the attributes above).
        self.models = models
        self._active = 0
        self._pixels = 0  # what the running requests hold of max_pixels
        self._running: set[Ticket] = set()  # their tickets: the memory they hold, their steps
        self._running_by_model: Counter[str] = Counter()  # how many run per model: the fair queue's measure
        self._epoch = 0  # counts starts: a request that saw none but its own during its run ran alone
        self._waiters = FairQueue()  # one FIFO per model, served fairly between them (engine.fair_queue)
        self._waiting: dict[asyncio.Future[None], Ticket] = {}  # each waiter's ticket (its cost), for the hand-over
        self._positions: dict[asyncio.Future[None], Progress] = {}  # waiters that asked for progress
        self._told: dict[asyncio.Future[None], int] = {}  # the position each of them was last told
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

    @property
    def pixels_running(self) -> int:
        """Pixels (width x height x images) of the generations running now; at most ``max_pixels`` when set."""
        return self._pixels

    def set_ready(self) -> None:
        self.ready_reason = None

    def start_draining(self) -> None:
        self.ready_reason = "draining"

    # -- admission --------------------------------------------------------------------------------------

    def _fits(self, ticket: Ticket) -> bool:
        over = self.max_pixels and self._pixels + ticket.request.pixels > self.max_pixels
        if self._active >= self.max_concurrency or over:
            return False
        # Alone, a request runs: it fitted on arrival, and a budget shrunk since by other processes never grows back.
        memory = self._memory_of(ticket)
        return memory is None or not self._running or self.memory_held + ticket.cost <= memory.budget

    def _take(self, ticket: Ticket) -> None:
        self._active += 1
        self._running_by_model[ticket.request.model] += 1
        self._waiters.started(ticket.request.model)
        self._pixels += ticket.request.pixels
        self._running.add(ticket)
        self._epoch += 1

    async def _acquire(self, ticket: Ticket, gone: asyncio.Event, deadline: float | None) -> None:
        self._refuse_early(ticket)
        if not self._waiters and self._fits(ticket):
            self._take(ticket)
            return
        if len(self._waiters) >= self.max_queue:
            self._shed_for(ticket.request.model)  # a fair share of the queue for each model, or Overloaded
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.push(waiter, ticket.request.model)
        self._waiting[waiter] = ticket
        if ticket.progress is not None:
            self._positions[waiter] = ticket.progress
        self._announce_positions()
        try:
            await self._race(waiter, gone, deadline)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot(ticket)  # the slot was handed to us as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
                self._start_waiting()  # a head that did not fit may have been holding the others back
                self._announce_positions()
            raise
        finally:
            self._positions.pop(waiter, None)
            self._told.pop(waiter, None)
            self._waiting.pop(waiter, None)

    def _thread_done(self, ticket: Ticket, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            # Retrieve it: after a timeout or a disconnect nobody awaits this future, and asyncio would log
            # "exception was never retrieved" for every abandoned request.
            future.exception()
        self._release_slot(ticket)

    def _release_slot(self, ticket: Ticket) -> None:
        self._active -= 1
        self._pixels -= ticket.request.pixels
        self._running.discard(ticket)
        self._running_by_model[ticket.request.model] -= 1
        if self._start_waiting():
            self._announce_positions()
        if self._active == 0:
            # Idle: a good moment to return cached memory, as it can't stall a running request.
            self._executor.submit(self._release_if_idle)

    def _start_waiting(self) -> bool:
        """Hand slots to the queue's head while it fits (the fair queue's head: a head that does not fit yet waits,
        and so do the ones behind it). True if anyone started."""
        started = False
        while (waiter := self._waiters.head(self._running_by_model)) is not None:
            if waiter.done():  # it gave up and is on its way out
                self._waiters.remove(waiter)
                continue
            ticket = self._waiting[waiter]
            if not self._fits(ticket):
                break
            self._waiters.remove(waiter)
            self._take(ticket)
            waiter.set_result(None)
            started = True
        return started

    def _release_if_idle(self) -> None:
        with self._memory_lock:
            # Read from a worker thread: a slot taken since we were submitted means work is waiting; skip.
            if self._active != 0:
                return
            try:
                self.release()
                if self.memory is not None:
                    self.memory.refresh()  # idle: the free memory holds nothing of a request's
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

    @tell_listeners
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
        ticket = Ticket(request, progress=progress, loop=asyncio.get_running_loop())
        gone = gone if gone is not None else asyncio.Event()
        deadline = ticket.arrived + self.request_timeout if self.request_timeout > 0 else None
        try:
            async with self._model_held(ticket, gone, deadline) as served:
                ticket.served = served
                async with self._adapters_held(request, served, gone, deadline):
                    return await self._admit_and_run(ticket, gone, deadline)
        except Exception as exc:
            self.stats[counter_of(exc, gone)] += 1
            raise

    async def _admit_and_run(self, ticket: Ticket, gone: asyncio.Event, deadline: float | None) -> GenerationResult:
        request = ticket.request
        await self._acquire(ticket, gone, deadline)
        admitted = time.monotonic()
        future = asyncio.wrap_future(self._executor.submit(self._run, ticket))
        # The slot is released when the thread is done, not when we stop waiting for it.
        future.add_done_callback(functools.partial(self._thread_done, ticket))
        try:
            images = await self._race(future, gone, deadline)
        except BaseException:
            ticket.cancel.set()  # whatever stopped us waiting, nobody wants this result any more
            raise
        self.stats["completed"] += 1
        done = time.monotonic()
        first = None if ticket.first_step_at is None else ticket.first_step_at - ticket.arrived
        return GenerationResult(
            images, request.seed, queued_s=admitted - ticket.arrived, first_step_s=first, generate_s=done - admitted
        )

    def _run(self, ticket: Ticket) -> list[Any]:
        """Worker thread: run the pipeline unless the request was abandoned while queued."""
        with self._memory_lock:
            pass  # wait for an idle-time memory release that began before this slot was taken
        if ticket.cancel.is_set():
            raise GenerationCancelled
        ticket.started_at = time.monotonic()
        ticket.report(ProgressEvent("started"))
        try:
            return self._measured(ticket)
        except BaseException as exc:
            if not is_oom(exc):
                raise
        # Freed outside the except block: until it ends, the traceback keeps the failed request's tensors alive.
        logger.error("out of memory in request %s; freeing caches", ticket.request.request_id)
        try:
            gc.collect()  # reference cycles from the failed call may hold tensors
            self.release()  # the configured release (release_memory by default)
        except Exception:  # noqa: BLE001 - the OOM answer matters more than a failed clean-up
            logger.exception("memory release failed")
        raise OutOfMemory

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
        """Stop the slot threads and the one model's runner and adapters (a model source closes its own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.models is None:
            Served(self.runner, adapters=self.adapters).close()  # the step strategy's loop and encoder threads
