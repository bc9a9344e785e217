"""The step strategy: one worker owns the denoising loop and batches the shared transformer across requests.

It plugs into ``Engine`` as its runner, so admission (slots, the bounded queue, deadlines, disconnects, drain) is the
same as with the threads strategy. What a slot thread does with it (``StepRunner.__call__``):

1. encode: the request's texts go to the encoder thread, which encodes whatever texts are waiting in one batch
   (through the prompt cache);
2. prepare: its own ``RequestScopedPipeline`` view of its task's pipeline class (cloned scheduler), on which the
   task (``engine.tasks``) sets the timesteps as that pipeline sets them and makes the starting latents, from a CPU
   generator seeded with the request's seed, with the pipeline's own ``prepare_latents`` (an init image is encoded
   here, in the slot thread);
3. denoise: the request joins the loop (``DenoiseLoop``) and the slot thread waits while the loop steps it;
4. decode: VAE decode and post-processing, in the slot thread again, then what the task makes of the decoded images
   (``Task.finish_images``, as the threads runner does: inpainting puts the input's pixels back outside the mask).

So the denoising worker never waits on text encoders or the VAE; it only runs transformer passes and scheduler
steps. The math of each step is the pipeline's own (its ``__call__``), applied to each
request's slice of the batched output.

Batch sizes follow a cost model of the device (``engine.costs``), calibrated at start-up on the loaded model
(``engine.calibrate``) and refined by every pass. On a CPU the calibration also chooses how many loops to run,
each with an equal, fixed share of the cores (two single-threaded passes side by side can beat one two-threaded
pass); a request goes to the loop with the least work left, and each loop batches its own requests. On other
devices there is one loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import torch

from utils.requestscopedpipeline import default_guidance_scale
from utils.wrappers import TiledVAE

from .adapters import AdapterPool
from .calibrate import Calibration, PassInputs, calibrate
from .cores import Cores
from .costs import CostModel
from .loop import DenoiseLoop, Track
from .prompt_cache import PromptCache, TextEmbedding, encode_texts, is_guided, request_embeddings
from .tasks import Task, TaskPipelines, get_task, refuse_unavailable
from .types import GenerationCancelled, GenerationRequest, Tiling, no_tiling

logger = logging.getLogger(__name__)

__all__ = ["StepRunner"]

MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 length; the server never changes it
ENCODE_BATCH_MAX = 64  # texts per encoder call: bounds the encoder's activation memory


class _EncoderThread:
    """Encodes texts for every request in one thread; whatever is waiting when it wakes is encoded as one batch."""

    def __init__(self, pipe: Any, device: Any, threads: int | None) -> None:
        self._pipe = pipe
        self._device = device
        self._threads = threads
        self._closed = False
        # Makes "not closed, then queued" one step: nothing is queued after close() has drained the inbox.
        self._closing = threading.Lock()
        self._inbox: queue.SimpleQueue[tuple[str, list[str], Future[list[TextEmbedding]]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="encode", daemon=True)
        self._thread.start()

    def encoder(self, role: str) -> Callable[[list[str]], list[TextEmbedding]]:
        """A function encoding texts of one role ("prompt" or "negative") in the next batch of that role."""

        def encode(texts: list[str]) -> list[TextEmbedding]:
            future: Future[list[TextEmbedding]] = Future()
            with self._closing:
                if self._closed:
                    raise GenerationCancelled
                self._inbox.put((role, texts, future))
            return future.result()

        return encode

    def close(self) -> None:
        with self._closing:
            self._closed = True
            self._inbox.put(None)
        self._thread.join(timeout=10)  # see DenoiseLoop.close
        while True:  # what arrived as it closed: answered, so that no slot thread waits forever
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[2].set_exception(GenerationCancelled())

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        while True:
            item = self._inbox.get()
            if item is None:
                return
            batch = [item]
            count = len(item[1])
            while count < ENCODE_BATCH_MAX:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._inbox.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
                count += len(more[1])
            # One encoder call per role, as the pipeline encodes a batch of prompts and then their negatives: a
            # request alone is then encoded exactly as the pipeline encodes it (batch 1 each), bit for bit.
            for role in dict.fromkeys(r for r, _, _ in batch):
                self._encode_batch([(texts, future) for r, texts, future in batch if r == role])

    def _encode_batch(self, batch: list[tuple[list[str], Future[list[TextEmbedding]]]]) -> None:
        unique = list(dict.fromkeys(t for texts, _ in batch for t in texts))
        try:
            found = dict(zip(unique, encode_texts(self._pipe, unique, self._device, MAX_SEQUENCE_LENGTH), strict=True))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for _, future in batch:
                future.set_exception(exc)
            return
        for texts, future in batch:
            future.set_result([found[t] for t in texts])


class StepRunner:
    """An ``Engine`` runner whose generations share one denoising loop (see the module's docstring).

    Args:
        scoped: the RequestScopedPipeline of the shared pipeline.
        device: the device the pipeline runs on.
        max_batch_size: images per transformer pass, both guidance halves counted.
        prompt_cache: the prompt cache (capacity 0: off).
        cpu_threads: on a CPU, the cores the denoising loops share (None: one loop, torch's setting).
        loops: on a CPU, how many denoising loops (0: as many as the calibration finds best); elsewhere one.
        costs: the cost model (None: a new one, learning from every pass).
        calibrate: measure the loaded model at start-up (else the cost model learns from the first passes alone).
        transformer: what the loops call (None: the pipeline's transformer); a wrapper of it, for instance.
        adapters: the LoRA pool (None: no adapters).
        tiles: whether a request's image size is decoded in tiles (diffusers' tiled decode, per request).
    """

    def __init__(
        self,
        scoped: Any,
        device: Any,
        max_batch_size: int = 32,
        prompt_cache: PromptCache | None = None,
        cpu_threads: int | None = None,
        loops: int = 0,
        costs: CostModel | None = None,
        calibrate: bool = True,
        transformer: Any = None,
        adapters: AdapterPool | None = None,
        tiles: Tiling = no_tiling,
    ) -> None:
        self.scoped = scoped
        self.tiles = tiles  # tiles(width, height): a request's decode runs in tiles (--vae-tiling)
        self.adapters = adapters
        self.pipelines = TaskPipelines(scoped)  # each task's pipeline class, over the same weights
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cache = prompt_cache or PromptCache(0)
        # What the pipeline itself uses when a call names no guidance scale (SD3: 7.0), so both engines agree.
        self._default_guidance = default_guidance_scale(scoped.pipeline) or 1.0
        # One view for the encoder: its tokenizers are locked, and it is only used by the encoder thread.
        # The encoder gets one thread: it runs beside the denoising worker, which owns the cores.
        self._encoder = _EncoderThread(scoped.make_view(), self.device, 1 if cpu_threads else None)
        self._encode_prompts = self._encoder.encoder("prompt")
        self._encode_negatives = self._encoder.encoder("negative")
        self.costs = costs if costs is not None else CostModel(max_batch_size)
        self.transformer = transformer if transformer is not None else scoped.pipeline.transformer
        loops = loops if self.device.type == "cpu" else 1
        self.calibration: Calibration | None = self._calibrate(cpu_threads, loops) if calibrate else None
        count = self.calibration.loops if self.calibration else max(1, loops)
        threads = self.calibration.threads if self.calibration else None
        if self.calibration is None and cpu_threads:
            threads = max(1, cpu_threads // count)
        # On a CPU the loops' passes and the decodes share the cores, a decode first (engine.cores).
        self.cores = Cores(cpu_threads) if cpu_threads and self.device.type == "cpu" else None
        self.loops = [
            DenoiseLoop(self.transformer, max_batch_size, threads, self.costs, name=f"denoise-{i}", cores=self.cores)
            for i in range(count)
        ]
        for loop in self.loops:
            loop.bind_adapters = adapters.bound if adapters is not None else None
        self.loop = self.loops[0]  # the first (the only one but on a CPU)
        self._dispatch = threading.Lock()  # makes "choose the least loaded loop, count the track there" one step
        # Bounds the decodes running at once where there are no Cores (off a CPU): a burst finishes together, and 16
        # concurrent VAE decodes would hold 16 sets of activations. Whoever waits here has already left the loop.
        self._decoders = threading.Semaphore(max(1, cpu_threads or 2))

    def _loop_for(self, track: Track) -> DenoiseLoop:
        """The loop with the least work left (each batches its own requests), the track counted in it at once."""
        with self._dispatch:
            loop = min(self.loops, key=lambda each: each.load)
            loop.reserve(track)
        return loop

    def _calibrate(self, cores: int | None, loops: int) -> Calibration:
        """Start-up calibration on inputs of the real shapes: the encoded empty prompt, latents of the default size."""
        pipe = self.scoped.pipeline
        embeds, pooled = request_embeddings(self._encode_prompts([""])[0], None, 1)
        side = int(getattr(pipe, "default_sample_size", 128))
        channels = int(pipe.transformer.config.in_channels)
        latents = torch.randn(1, channels, side, side, generator=torch.Generator("cpu").manual_seed(0))
        inputs = PassInputs(latents.to(self.device, embeds.dtype), embeds.to(self.device), pooled.to(self.device))
        return calibrate(self.transformer, inputs, self.costs, cores, loops, self._new_costs)

    def _new_costs(self) -> CostModel:
        return CostModel(self.costs.max_batch, self.costs.tolerance, self.costs.window, self.costs.probe_every)

    def _label(self, group: Hashable) -> str:
        """A group (latent height, width) as the image size clients ask for."""
        scale = int(getattr(self.scoped.pipeline, "vae_scale_factor", 8))
        height, width = group  # type: ignore[misc]
        return f"{height * scale}x{width * scale}"

    @property
    def stats(self) -> dict[str, Any]:
        """The loops' passes together (as one loop's ``stats()``), the loops and the cost model's table."""
        each = [loop.stats() for loop in self.loops]
        sizes: Counter[int] = Counter()
        for one in each:
            sizes.update(one["pass_sizes"])
        passes, images = sum(s["passes"] for s in each), sum(s["images"] for s in each)
        return {
            "passes": passes,
            "images": images,
            "largest_pass": max(s["largest_pass"] for s in each),
            "mean_pass": images / passes if passes else 0.0,
            "pass_sizes": dict(sorted(sizes.items())),
            "loops": len(self.loops),
            "threads_per_loop": self.loop.cpu_threads,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "costs": self.costs.table(self._label),
        }

    def close(self) -> None:
        for loop in self.loops:
            loop.close()
        self._encoder.close()

    def __call__(self, request: GenerationRequest, on_step: Callable[..., None]) -> list[Any]:
        task = get_task(request.task)
        refuse_unavailable(task, self.scoped.pipeline)  # before any work: a ValueError naming the reason
        if request.loras and self.adapters is None:
            raise ValueError("this server has no LoRA adapters (--lora, --lora-dir)")
        positive = self.cache.get([request.prompt], self._encode_prompts, MAX_SEQUENCE_LENGTH)[0]
        negative = None
        if is_guided(request):
            negative = self.cache.get([request.negative_prompt or ""], self._encode_negatives, MAX_SEQUENCE_LENGTH)[0]
        track = self._prepare(task, request, positive, negative, on_step)
        latents = self._loop_for(track).run(track)
        # The loop promised this decode a core when it finished the track (Cores.promise): taken here, first.
        with self.cores.decoding(promised=True) if self.cores else self._decoders:
            images = self._decode(task, track.view, latents, self.tiles(request.width, request.height))
        return task.finish_images(request, images)  # as the threads runner's: what the task makes of the decode

    def _prepare(
        self,
        task: Task,
        request: GenerationRequest,
        positive: TextEmbedding,
        negative: TextEmbedding | None,
        on_step: Callable[..., None],
    ) -> Track:
        """The request's view, embeddings and guidance; its task gives the starting latents and timesteps."""
        view = self.pipelines.get(task.pipeline_class).make_view(device=self.device)
        embeds, pooled = request_embeddings(positive, negative, request.num_images)
        embeds, pooled = embeds.to(self.device), pooled.to(self.device)
        start = task.start(view, request, embeds.dtype, self.device)
        guidance = self._default_guidance if request.guidance_scale is None else float(request.guidance_scale)
        return Track(
            view=view,
            timesteps=start.timesteps,
            latents=start.latents,
            embeds=embeds,
            pooled=pooled,
            guidance=guidance if negative is not None else None,
            on_step=on_step,
            after_step=start.after_step,
            condition=start.condition,
            # Batched with requests of the same latent size and the same LoRA adapters (and scales), only.
            group=(tuple(start.latents.shape[-2:]), request.loras),
            adapters=request.loras,
        )

    @staticmethod
    def _decode(task: Task, view: Any, latents: torch.Tensor, tiled: bool = False) -> list[Any]:
        if latents is None:
            raise GenerationCancelled
        with torch.no_grad():
            latents = task.vae_input(view, latents)
            vae = TiledVAE(view.vae) if tiled else view.vae  # per request: the shared VAE's flag is never set
            image = vae.decode(latents, return_dict=False)[0]
            return list(view.image_processor.postprocess(image, output_type="pil"))
