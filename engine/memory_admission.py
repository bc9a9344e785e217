"""Admission by measured memory: what a request costs, what the running requests may hold, how long one would wait.

A request's cost is the peak memory its work adds, measured, not assumed (``MemoryMeter``: the allocator's figures on
a GPU, the process's on a CPU):

- at start-up (``measure_costs``), one transformer pass (batch 2: a guided image) and one VAE decode of the loaded
  model at a measuring size, as bytes per image pixel; a request's pass costs that times its pixels (both guidance
  halves counted), its decode that times its pixels (a tiled decode: one tile's worth a image, plus the output);
- as requests run (``observe``): the peak of a request that ran alone. A request never costs less than one that ran
  alone with as many pixels or fewer (a floor), and one that ran alone at least as large as the start-up measurement
  and took more than the estimate scales every estimate up by that ratio (activations that grow faster than the
  pixels, a backend's workspace). Requests estimated under 64 MiB teach no ratio: their fixed overheads (a thread
  pool started, an allocator's arena grown) are noise per pixel.

The budget is ``--memory-budget`` (with several models, less what their resident weights hold: one budget of
weights and requests together), or the free memory measured while the engine is idle (after the load, and again
each time it falls idle), less ``--memory-reserve``. The engine admits while the running requests' costs and the
newcomer's fit it; a request that cannot fit even alone is refused at once with the sizes that would
(``refusal``), and one whose wait for memory would pass ``max_wait`` is refused with a Retry-After (``wait``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .memory_meter import MemoryMeter

logger = logging.getLogger(__name__)

__all__ = ["MemoryAdmission", "measure_costs"]

OBSERVED = 16  # the recent requests that ran alone, which correct the estimate
# A request teaches a ratio only if it was estimated at this much or more: below it, what else the process did (a
# thread pool started, an allocator's arena grew) outweighs the request's own activations.
TEACHING_BYTES = 64 * 2**20
OUTPUT_BYTES = 12  # a decoded image's float32 RGB tensor, per pixel, which a tiled decode still holds whole


class MemoryAdmission:
    """The cost model and the budget (see the module's docstring)."""

    def __init__(
        self,
        meter: MemoryMeter,
        reserve: int = 0,
        budget: int = 0,
        max_wait: float = 0.0,
        tiles: Callable[[int, int], bool] | None = None,
        tile_pixels: int = 0,
        size_multiple: int = 16,
        max_side: int = 1024,
        weights: Callable[[], int] | None = None,
    ) -> None:
        self.meter = meter
        self.reserve = reserve
        self.fixed_budget = budget  # --memory-budget (0: the free memory measured when idle)
        # Several models: the bytes the resident models' weights hold now, which a fixed budget covers too (the
        # free memory measured when idle has them out already).
        self.weights = weights
        self.max_wait = max_wait  # seconds a request may wait for memory (0: no limit)
        self.tiles = tiles or (lambda width, height: False)
        self.tile_pixels = tile_pixels  # a VAE tile's pixels (0: no tiling)
        self.size_multiple, self.max_side = size_multiple, max_side  # the sizes a refusal may offer
        self.pass_per_pixel = 0.0  # bytes a transformer pass adds per image pixel in its batch
        self.decode_per_pixel = 0.0  # bytes a VAE decode adds per image pixel
        self.measured_at: tuple[int, int] | None = None  # the measuring size (width, height)
        # (pixels, peak bytes, the estimate then) of recent requests that ran alone
        self._observed: deque[tuple[int, int, int]] = deque(maxlen=OBSERVED)
        # Protects _observed: a worker thread appends what a request measured, the event loop reads estimates.
        self._lock = threading.Lock()
        self.free_idle = meter.free()

    @property
    def budget(self) -> int:
        """Bytes the running requests may hold together."""
        free = self.fixed_budget or self.free_idle
        held = self.weights() if self.fixed_budget and self.weights is not None else 0
        return max(0, free - held - self.reserve)

    def refresh(self) -> None:
        """Measure the free memory again (the engine is idle: nothing of a request's is in it). From a worker thread:
        one attribute, written whole, which the event loop reads."""
        self.free_idle = self.meter.free()

    def _model(self, width: int, height: int, images: int, guided: bool) -> int:
        """The start-up measurement's estimate: the larger of the pass and the decode."""
        pixels = width * height
        passing = self.pass_per_pixel * pixels * images * (2 if guided else 1)
        if self.tiles(width, height) and self.tile_pixels:
            decoding = self.decode_per_pixel * min(pixels, self.tile_pixels) * images + OUTPUT_BYTES * pixels * images
        else:
            decoding = self.decode_per_pixel * pixels * images
        return int(max(passing, decoding))

    @property
    def scale(self) -> float:
        """How much more than the estimate large requests that ran alone took (1: no more)."""
        smallest = (self.measured_at[0] * self.measured_at[1]) if self.measured_at else 0
        teaching = [(peak, model) for pixels, peak, model in self._seen() if pixels >= smallest]
        ratios = [peak / model for peak, model in teaching if model >= TEACHING_BYTES]
        return max([1.0, *ratios])

    def cost(self, width: int, height: int, images: int, guided: bool = True) -> int:
        """The estimated peak bytes of a request of ``images`` images of ``width`` x ``height``."""
        pixels = width * height * images
        floor = max((peak for seen, peak, _ in self._seen() if seen <= pixels), default=0)
        return int(max(self._model(width, height, images, guided) * self.scale, floor))

    def request_cost(self, request: Any) -> int:
        from .prompt_cache import is_guided

        return self.cost(request.width, request.height, request.num_images, is_guided(request))

    def observe(self, request: Any, peak: int) -> None:
        """A request ran alone and its work added ``peak`` bytes at most."""
        from .prompt_cache import is_guided

        model = self._model(request.width, request.height, request.num_images, is_guided(request))
        with self._lock:
            self._observed.append((request.width * request.height * request.num_images, peak, model))

    def _seen(self) -> list[tuple[int, int, int]]:
        with self._lock:
            return list(self._observed)

    def fits_alone(self, cost: int) -> bool:
        return cost <= self.budget

    def refusal(self, width: int, height: int, images: int, guided: bool = True) -> str | None:
        """Why a request can never run here, with the sizes that would (None: it fits alone)."""
        cost = self.cost(width, height, images, guided)
        if cost <= self.budget:
            return None
        options = []
        for n in sorted({1, images}):
            side = self._largest_side(n, guided)
            if side:
                options.append(f"{n} image(s) of up to {side}x{side}")
        fits = "; ".join(options) if options else "nothing: even one image of the smallest size does not fit"
        return (
            f"{images} image(s) of {width}x{height} need about {_mb(cost)} of memory, more than the "
            f"{_mb(self.budget)} this server's requests may use (--memory-budget, or the free memory less "
            f"--memory-reserve); what fits: {fits}"
        )

    def _largest_side(self, images: int, guided: bool) -> int:
        best, side = 0, self.size_multiple
        while side <= self.max_side and self.cost(side, side, images, guided) <= self.budget:
            best, side = side, side + self.size_multiple
        return best

    def wait(self, cost: int, ahead: int, running: Sequence[tuple[int, float | None]]) -> float | None:
        """Seconds until ``cost`` fits behind ``ahead`` bytes of queued requests, as the ``running`` requests (cost,
        seconds left; None: unknown yet) finish; None when it cannot be told (a running one has not stepped)."""
        held = sum(c for c, _ in running)
        if held + ahead + cost <= self.budget:
            return 0.0
        for c, left in sorted(running, key=lambda item: math.inf if item[1] is None else item[1]):
            if left is None:
                return None
            held -= c
            if held + ahead + cost <= self.budget:
                return left
        return None

    def status(self) -> dict[str, Any]:
        """The estimate, for /api/status."""
        width, height = self.measured_at or (0, 0)
        return {
            "source": self.meter.source,
            "budget_bytes": self.budget,
            "free_bytes_when_idle": self.free_idle,
            "reserve_bytes": self.reserve,
            "fixed_budget_bytes": self.fixed_budget or None,
            "measured_at": f"{width}x{height}" if self.measured_at else None,
            "pass_bytes_per_pixel": round(self.pass_per_pixel, 2),
            "decode_bytes_per_pixel": round(self.decode_per_pixel, 2),
            "observed_runs": len(self._seen()),
            "observed_scale": round(self.scale, 3),
            "max_wait_s": self.max_wait or None,
            # What one guided image costs now, at the model's default size (twice the measured side) and the largest.
            "image_cost_bytes": {f"{side}x{side}": self.cost(side, side, 1) for side in self._sides(width)},
        }

    def _sides(self, measured: int) -> list[int]:
        return sorted({side for side in (2 * measured, self.max_side) if side})


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def measure_costs(admission: MemoryAdmission, pipeline: Any, device: Any) -> None:
    """Measure one pass (batch 2) and one decode of ``pipeline`` at half its default size into ``admission``."""
    transformer, vae = pipeline.transformer, pipeline.vae
    scale = int(getattr(pipeline, "vae_scale_factor", 8))
    patch = int(transformer.config.patch_size)
    side = max(2 * patch, int(getattr(pipeline, "default_sample_size", 128)) // 2 // patch * patch)
    latents = torch.randn(
        2, int(transformer.config.in_channels), side, side, generator=torch.Generator().manual_seed(0)
    )
    latents = latents.to(device, _activation_dtype(pipeline))
    tokens = 77 * 2 if getattr(pipeline, "text_encoder_3", None) is None else 77 + 256
    embeds = torch.zeros(2, tokens, int(transformer.config.joint_attention_dim), device=device, dtype=latents.dtype)
    pooled = torch.zeros(2, int(transformer.config.pooled_projection_dim), device=device, dtype=latents.dtype)
    timestep = torch.full((2,), 500.0, device=device, dtype=latents.dtype)
    pixels = (side * scale) ** 2
    meter = admission.meter
    with torch.no_grad():
        passed = meter.measure(lambda: transformer(latents, embeds, pooled, timestep, return_dict=False))
        vae_latents = latents[:1].to(vae.dtype)
        decoded = meter.measure(lambda: vae.decode(vae_latents, return_dict=False))
    # A CPU's process figures may not move at all when the allocator reuses memory an earlier piece of work freed:
    # what the work must hold (a pass's output, as large as its input; the decoded image) is the least it costs.
    passed = max(passed, latents.numel() * latents.element_size())
    decoded = max(decoded, 3 * pixels * vae_latents.element_size())
    admission.pass_per_pixel = passed / (2 * pixels)
    admission.decode_per_pixel = decoded / pixels
    admission.measured_at = (side * scale, side * scale)
    logger.info(
        "memory per request measured at %dx%d (%s): pass %s (batch 2), decode %s; budget %s",
        side * scale,
        side * scale,
        meter.source,
        _mb(passed),
        _mb(decoded),
        _mb(admission.budget),
    )


def _activation_dtype(pipeline: Any) -> torch.dtype:
    """The dtype the pipeline's latents run in: its embeddings', the text encoders' (as the pipeline takes it)."""
    encoder = getattr(pipeline, "text_encoder", None) or pipeline.vae
    return encoder.dtype
