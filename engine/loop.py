"""The denoising loop of the step strategy: one worker thread, the only caller of the shared transformer.

Each turn of the loop is one transformer pass over a batch of requests (``Track``) of one resolution group, then
each request's own scheduler steps its own slice of the output. Requests join at the next turn and leave after
their last step, or after the step at which they were cancelled.

Fairness: the loop serves the resolution groups in turn (round robin), one pass each, so with G groups waiting a
request waits at most G - 1 passes between its steps; a lone 64x64 request behind a stream of 128x128 ones runs
every other pass.

Batch size and order within a group: a pass holds at most what the cost model allows (``CostModel.batch_limit``:
never past the measured size beyond which images per second stop growing, nor ``max_batch_size``; within that, the
size whose waves finish the group's waiting requests soonest on average); the requests past it wait in the loop
and join as others finish, at the next pass. The requests closest to done go first: ordered by their remaining
steps less half the passes of their group they were left out of (``AGING``), so a burst finishes in waves rather
than all at its end: the requests running step every pass and so draw nearer to done faster than a waiting one
gains, and keep their places to the end. Yet a waiting request does gain, so a long one behind a stream of short
ones of S steps gets in after about twice its surplus over S in passes; none is left behind. Each pass's time is
recorded in the cost model.

Out of memory: a failing pass is retried as two halves, recursively; a single request that still fails is
answered with the error (the Engine turns it into OutOfMemory, 503) and the loop goes on with the others.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .cores import Cores
from .costs import CostModel, pass_clock
from .memory import is_oom, release_memory
from .types import GenerationCancelled

logger = logging.getLogger(__name__)

__all__ = ["DenoiseLoop", "Track"]

AGING = 0.5  # steps of priority a waiting track gains per pass it is left out of (< 1: the running keep theirs)


@dataclass(eq=False)
class Track:
    """One request's place in the loop: its view (own scheduler), latents and conditioning."""

    view: Any
    timesteps: torch.Tensor
    latents: torch.Tensor
    embeds: torch.Tensor  # [negative x n, prompt x n] when guided, else [prompt x n]
    pooled: torch.Tensor
    guidance: float | None  # None: no classifier-free guidance (guidance_scale <= 1)
    on_step: Callable[..., None]  # (step, latents)
    group: Hashable
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # the task's (engine.tasks.base.Start)
    condition: torch.Tensor | None = None  # the task's channels beside the latents, every pass (Start.condition)
    adapters: tuple[tuple[str, float], ...] = ()  # the request's LoRA set: part of its group, bound for its passes
    index: int = 0
    last_pass: int = -1  # the loop's pass count when it last stepped
    waited: int = 0  # passes of its group it was left out of (for the order, see the module docstring)
    arrival: int = 0  # the order the loop took it in (set by the loop)
    done: Future[torch.Tensor] = field(default_factory=Future)

    @property
    def images(self) -> int:
        """Samples in a transformer pass (both guidance halves)."""
        return self.embeds.shape[0]

    @property
    def cost_group(self) -> Hashable:
        """What its passes cost is measured by: the latent size (the group key may add the LoRA set, which batches
        apart but costs the same; calibration measures by size, engine.calibrate)."""
        return tuple(self.latents.shape[-2:])

    @property
    def work(self) -> int:
        """Samples left to pass through the transformer: its remaining steps times its images (read racily from
        other threads, which only choose a loop by it)."""
        return (len(self.timesteps) - self.index) * self.images


class DenoiseLoop:
    """The worker that steps every active ``Track``; ``run(track)`` blocks until the track is finished.

    ``costs``: the cost model the batch size follows and every pass is recorded in (None: batches up to
    ``max_batch_size``, nothing measured). ``cpu_threads``: this loop's torch threads (None: torch's setting).
    """

    def __init__(
        self,
        transformer: Any,
        max_batch_size: int = 32,
        cpu_threads: int | None = None,
        costs: CostModel | None = None,
        name: str = "denoise",
        cores: Cores | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.transformer = transformer
        self.max_batch_size = max_batch_size
        self.bind_adapters: Callable[..., Any] | None = None  # AdapterPool.bound, where the server has adapters
        self.cpu_threads = cpu_threads
        self._clock = pass_clock(cpu_threads)
        self.cores = cores  # on a CPU: the cores its passes share with the slot threads' decodes (engine.cores)
        self.costs = costs if costs is not None else CostModel(max_batch_size, learn=False)
        # The tracks handed to this loop and not finished, for the runner's choice of a loop (``load``).
        self._assigned: set[Track] = set()
        self._assigned_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Track | None] = queue.SimpleQueue()
        # Tracks by resolution group, groups in serving order. Only the worker thread touches it.
        self._groups: OrderedDict[Hashable, list[Track]] = OrderedDict()
        self._arrivals = itertools.count()
        self._passes = 0
        self._images = 0
        self._largest = 0
        # Passes counted by their size in images (a histogram for /metrics). Protects _pass_sizes: the worker counts,
        # stats() copies from another thread, and a dict must not grow while it is being copied.
        self._sizes_lock = threading.Lock()
        self._pass_sizes: Counter[int] = Counter()
        self._stopped = False
        # Makes "not stopped, then queued" one step, so nothing is queued after the worker's last drain.
        self._closing = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        """Transformer passes run, the images they carried, the largest pass, the mean, and passes by size."""
        mean = self._images / self._passes if self._passes else 0.0
        with self._sizes_lock:
            sizes = dict(sorted(self._pass_sizes.items()))
        return {
            "passes": self._passes,
            "images": self._images,
            "largest_pass": self._largest,
            "mean_pass": mean,
            "pass_sizes": sizes,
        }

    @property
    def load(self) -> int:
        """Samples still to pass through the transformer for the tracks handed to this loop."""
        with self._assigned_lock:
            return sum(track.work for track in self._assigned)

    @property
    def arriving(self) -> int:
        """Tracks handed to the loop and not yet taken in (they join at the next pass)."""
        return self._inbox.qsize()

    def reserve(self, track: Track) -> None:
        """Count ``track`` in this loop's ``load`` from now (``run`` does it too; a runner choosing between loops
        reserves under its own lock, so two requests arriving at once do not both see the same loop idle)."""
        with self._assigned_lock:
            self._assigned.add(track)

    def run(self, track: Track) -> torch.Tensor:
        """Join the loop and wait; return the final latents, or raise what stopped the track."""
        self.reserve(track)
        try:
            with self._closing:
                if self._stopped:
                    raise GenerationCancelled
                self._inbox.put(track)
            return track.done.result()
        finally:
            with self._assigned_lock:
                self._assigned.discard(track)

    def close(self) -> None:
        """Stop the worker after its current pass; tracks still in the loop end with GenerationCancelled."""
        with self._closing:
            self._stopped = True
            self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            # Joined (briefly): a daemon thread still inside torch when the interpreter exits can abort the process.
            self._thread.join(timeout=10)

    # -- the worker -------------------------------------------------------------------------------------

    def _work(self) -> None:
        if self.cpu_threads:
            # The thread running this loop's transformer passes gets its share of the cores (all of them with one
            # loop; the slot threads only encode and decode). Fixed: the same request gives the same image.
            torch.set_num_threads(self.cpu_threads)
        try:
            with torch.no_grad():
                while self._admit():
                    group = self._next_group()
                    if group is None:
                        continue
                    waiting = sum(track.images for track in self._groups[group])
                    cost_group = self._groups[group][0].cost_group
                    limit = min(self.max_batch_size, self.costs.batch_limit(cost_group, waiting))
                    batch = self._pick(self._groups[group], limit)
                    picked = set(batch)
                    for track in self._groups[group]:
                        track.waited += track not in picked
                    self._groups.move_to_end(group)  # served: last in the round robin
                    size = sum(t.images for t in batch)
                    self._passes += 1
                    self._images += size
                    self._largest = max(self._largest, size)
                    with self._sizes_lock:
                        self._pass_sizes[size] += 1
                    with self.cores.passing(self.cpu_threads) if self.cores else contextlib.nullcontext():
                        self._step(batch)
                    self._retire(group)
        except Exception:  # pragma: no cover - a bug here must not leave slot threads waiting forever
            logger.exception("the denoising loop stopped")
            raise
        finally:
            with self._closing:
                self._stopped = True
                self._cancel_all()

    def _cancel_all(self) -> None:
        """Closing: every track still here or still arriving ends now, so that no slot thread waits forever."""
        waiting = [t for tracks in self._groups.values() for t in tracks]
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                waiting.append(item)
        for track in waiting:
            if not track.done.done():
                track.done.set_exception(GenerationCancelled())
        self._groups.clear()

    def _admit(self) -> bool:
        """Move arrivals into their groups; block while there is nothing to do. False when closing."""
        block = not any(self._groups.values())
        while True:
            try:
                track = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if track is None:
                return False
            track.arrival = next(self._arrivals)
            self._groups.setdefault(track.group, []).append(track)
            block = False

    def _next_group(self) -> Hashable | None:
        for group, tracks in self._groups.items():
            if tracks:
                return group
        return None

    def _pick(self, tracks: list[Track], limit: int) -> list[Track]:
        """The tracks of this pass, up to ``limit`` images (at least one track): closest to done first, less
        ``AGING`` steps for every pass a track was left out of (see the module docstring)."""

        def order(track: Track) -> tuple[float, int]:
            return len(track.timesteps) - track.index - AGING * track.waited, track.arrival

        batch: list[Track] = []
        total = 0
        for track in sorted(tracks, key=order):
            if batch and total + track.images > limit:
                continue
            batch.append(track)
            total += track.images
        return batch

    def _retire(self, group: Hashable) -> None:
        tracks = [t for t in self._groups[group] if not t.done.done()]
        if tracks:
            self._groups[group] = tracks
        else:
            del self._groups[group]

    def _step(self, batch: list[Track]) -> None:
        """One denoising step for every track of ``batch``; failures are answered to the tracks they hit."""
        try:
            noise = self._forward(batch)
        except Exception as exc:  # noqa: BLE001 - answered to this batch's requests; the loop goes on
            logger.error("transformer pass failed for %d request(s): %s", len(batch), type(exc).__name__)
            for track in batch:
                if not track.done.done():  # an out-of-memory answer may already be there (_forward)
                    track.done.set_exception(exc)
            return
        for track, pred in zip(batch, noise, strict=True):
            if pred is None:
                continue  # answered out of memory by _forward
            try:
                self._advance(track, pred)
            except BaseException as exc:  # noqa: BLE001 - a cancel (or a failed step) ends this track only
                track.done.set_exception(exc)

    def _advance(self, track: Track, noise_pred: torch.Tensor) -> None:
        """The pipeline's guidance and scheduler step on this track's slice, then its step callback."""
        if track.guidance is not None:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + track.guidance * (text - uncond)
        t = track.timesteps[track.index]
        track.latents = track.view.scheduler.step(noise_pred, t, track.latents, return_dict=False)[0]
        track.last_pass = self._passes
        step = track.index
        if track.after_step is not None:
            track.latents = track.after_step(step, track.latents)
        track.index += 1
        track.on_step(step, track.latents)  # raises GenerationCancelled when the request was abandoned
        if track.index == len(track.timesteps):
            if self.cores is not None:
                self.cores.promise()  # its decode goes before this loop's next pass (engine.cores)
            track.done.set_result(track.latents)

    def _forward(self, batch: list[Track]) -> list[torch.Tensor | None]:
        """The transformer on the whole batch; on out-of-memory, on two halves (recursively). A lone track that
        still runs out of memory gets the error and None in its place."""
        try:
            return self._pass(batch)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(exc):
                raise
        release_memory()
        if len(batch) == 1:
            logger.error("out of memory in a transformer pass of one request")
            batch[0].done.set_exception(MemoryError("out of memory in the transformer"))
            return [None]
        half = len(batch) // 2
        logger.warning("out of memory in a pass of %d requests; retrying as two smaller passes", len(batch))
        return self._forward(batch[:half]) + self._forward(batch[half:])

    def _pass(self, batch: list[Track]) -> list[torch.Tensor]:
        hidden, timesteps = [], []
        for track in batch:
            copies = 2 if track.guidance is not None else 1
            latents = track.latents if track.condition is None else torch.cat([track.latents, track.condition], 1)
            hidden.extend([latents] * copies)
            timesteps.append(track.timesteps[track.index].expand(track.images))
        started = self._clock()
        # One group, one adapter set (it is part of the group key): the pool's gate switches only between passes.
        with self.bind_adapters(batch[0].adapters) if self.bind_adapters else contextlib.nullcontext():
            out = self.transformer(
                hidden_states=torch.cat(hidden),
                timestep=torch.cat(timesteps),
                encoder_hidden_states=torch.cat([t.embeds for t in batch]),
                pooled_projections=torch.cat([t.pooled for t in batch]),
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # the pass's time, not its launch's (the step waits for it anyway)
        self.costs.record(batch[0].cost_group, out.shape[0], self._clock() - started)
        return list(out.split([t.images for t in batch]))
