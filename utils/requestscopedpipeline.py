"""One shared pipeline, many concurrent requests: a cheap per-request view.

What a request's view holds:
- shared with the base pipeline: every weight-bearing component (transformer, VAE, text encoders), large
  tensors (more elements than ``tensor_numel_threshold``) and everything immutable;
- its own: the scheduler (``BaseAsyncScheduler.clone_for_request``), small mutable attributes (lists, dicts,
  sets, small tensors, RNGs), and the per-call state the pipeline writes on ``self`` (``_guidance_scale``,
  ``_interrupt``, ...), which lands on the view because the view is a separate object;
- locked: the tokenizers, wrapped (on the view only) with one lock, because Rust tokenizers fail with
  ``Already borrowed`` when two threads encode at once.

The base pipeline is never written to by a request.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
from collections.abc import Iterable
from typing import Any

import torch

from .scheduler import BaseAsyncScheduler
from .wrappers import ThreadSafeImageProcessorWrapper, ThreadSafeTokenizerWrapper, ThreadSafeVAEWrapper, TiledVAE

logger = logging.getLogger(__name__)

__all__ = ["RequestScopedPipeline"]

# Names that must never be cloned or replaced on a view: the config (a FrozenDict shared on purpose) and
# bookkeeping of offload hooks, which belongs to the shared weights.
_NEVER_CLONE = frozenset({"_internal_dict", "_all_hooks", "_offload_gpu_id", "_offload_device"})


def _is_tokenizer(obj: Any) -> bool:
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency of every SD3 pipeline
        PreTrainedTokenizerBase = ()  # noqa: N806
    if isinstance(obj, PreTrainedTokenizerBase):
        return True
    # Duck typing for tokenizers that do not derive from transformers' base class.
    name = type(obj).__name__.lower()
    return "tokenizer" in name and callable(obj) and hasattr(obj, "decode")


class RequestScopedPipeline:
    """Run one shared diffusers pipeline from many threads at once.

    Args:
        pipeline: the shared pipeline; its weights are used by every request and never copied.
        mutable_attrs: attribute names to clone for every request, on top of the auto-detected ones.
        auto_detect_mutables: clone small mutable attributes (lists, dicts, sets, small tensors, generators).
        tensor_numel_threshold: tensors with more elements than this are shared rather than cloned.
        tokenizer_lock: the lock serialising tokenizer calls; one is created when not given.
        wrap_scheduler: give each view a ``BaseAsyncScheduler`` (else the bare cloned scheduler).
        vae_lock: when given, the view's VAE is wrapped so that encode/decode run one at a time (bounds the
            memory peak of concurrent decodes on a GPU).
        image_processor_lock: when given, the view's image processor is wrapped with it.
    """

    def __init__(
        self,
        pipeline: Any,
        mutable_attrs: Iterable[str] | None = None,
        auto_detect_mutables: bool = True,
        tensor_numel_threshold: int = 1_000_000,
        tokenizer_lock: Any | None = None,
        wrap_scheduler: bool = True,
        *,
        vae_lock: Any | None = None,
        image_processor_lock: Any | None = None,
    ) -> None:
        self._base = pipeline
        self.mutable_attrs = tuple(mutable_attrs or ())
        self.auto_detect_mutables = auto_detect_mutables
        self.tensor_numel_threshold = tensor_numel_threshold
        # Serialises every tokenizer call of every request: the Rust tokenizers are not re-entrant.
        self.tokenizer_lock = tokenizer_lock if tokenizer_lock is not None else threading.Lock()
        self.wrap_scheduler = wrap_scheduler
        self.vae_lock = vae_lock
        self.image_processor_lock = image_processor_lock

        components = set(getattr(pipeline, "components", {}) or {})
        self._component_names = frozenset(components)
        self._tokenizer_names = tuple(
            name for name, value in vars(pipeline).items() if value is not None and _is_tokenizer(value)
        )
        # Kept privately: wrapping the base pipeline's own scheduler would be a write to shared state.
        base_scheduler = getattr(pipeline, "scheduler", None)
        self._scheduler = BaseAsyncScheduler(base_scheduler) if base_scheduler is not None else None

    @property
    def pipeline(self) -> Any:
        """The shared base pipeline."""
        return self._base

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        """The attributes detected as tokenizers (wrapped with the lock on every view)."""
        return self._tokenizer_names

    # -- building a view -------------------------------------------------------------------------------

    def _clone_value(self, value: Any) -> Any:
        """A per-request copy of a small mutable value; large tensors and opaque objects are shared."""
        if isinstance(value, torch.Tensor):
            if value.numel() > self.tensor_numel_threshold:
                return value
            return value.detach().clone()
        if isinstance(value, torch.Generator):
            clone = torch.Generator(device=value.device)
            clone.set_state(value.get_state())
            return clone
        if isinstance(value, (list, dict, set)):
            return copy.copy(value)
        try:
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - an object that cannot be copied is shared, as diffusers would
            logger.debug("could not copy %s; sharing it", type(value).__name__, exc_info=True)
            return value

    def _is_auto_mutable(self, name: str, value: Any) -> bool:
        if name in self._component_names or name in _NEVER_CLONE or name.startswith("__"):
            return False
        if isinstance(value, torch.Tensor):
            return value.numel() <= self.tensor_numel_threshold
        if isinstance(value, torch.Generator):
            return True
        # FrozenDict and other immutable mappings subclass dict but are never written to.
        return type(value) in (list, dict, set)

    @staticmethod
    def _is_read_only(obj: Any, name: str) -> bool:
        attr = getattr(type(obj), name, None)
        return isinstance(attr, property) and attr.fset is None

    def _set(self, view: Any, name: str, value: Any) -> None:
        if self._is_read_only(view, name):
            # e.g. `components` is a read-only property: writing it raises "can't set attribute".
            logger.debug("skipping read-only attribute %s", name)
            return
        # object.__setattr__ bypasses DiffusionPipeline.__setattr__, which would re-register the component
        # in the view's config; the view must keep the base's config as it is.
        object.__setattr__(view, name, value)

    def make_view(
        self, num_inference_steps: int | None = None, device: str | torch.device | None = None, vae_tiling: bool = False
    ) -> Any:
        """Build the per-request view: a shallow copy with its own scheduler, mutables and locked tokenizers;
        ``vae_tiling``: its VAE decodes in tiles (``TiledVAE``; the shared VAE is not touched)."""
        view = copy.copy(self._base)

        if self._scheduler is not None:
            scheduler = self._scheduler.clone_for_request(num_inference_steps, device=device)
            self._set(view, "scheduler", scheduler if self.wrap_scheduler else scheduler.scheduler)

        names: dict[str, None] = dict.fromkeys(self.mutable_attrs)
        if self.auto_detect_mutables:
            names.update(dict.fromkeys(n for n, v in vars(self._base).items() if self._is_auto_mutable(n, v)))
        for name in names:
            if hasattr(self._base, name):
                self._set(view, name, self._clone_value(getattr(self._base, name)))

        for name in self._tokenizer_names:
            self._set(view, name, ThreadSafeTokenizerWrapper(getattr(self._base, name), self.tokenizer_lock))
        if self.vae_lock is not None and getattr(self._base, "vae", None) is not None:
            self._set(view, "vae", ThreadSafeVAEWrapper(self._base.vae, self.vae_lock))
        if self.image_processor_lock is not None and getattr(self._base, "image_processor", None) is not None:
            wrapped = ThreadSafeImageProcessorWrapper(self._base.image_processor, self.image_processor_lock)
            self._set(view, "image_processor", wrapped)
        if vae_tiling and getattr(view, "vae", None) is not None:
            self._set(view, "vae", TiledVAE(view.vae))
        return view

    def generate(
        self,
        *args: Any,
        num_inference_steps: int = 50,
        device: str | torch.device | None = None,
        vae_tiling: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run the pipeline for one request on its own view and return the pipeline's output."""
        view = self.make_view(num_inference_steps, device=device, vae_tiling=vae_tiling)
        offload = getattr(view, "model_cpu_offload_context", None)
        context = offload() if callable(offload) else contextlib.nullcontext()
        with context:
            return view(*args, num_inference_steps=num_inference_steps, **kwargs)


def default_guidance_scale(pipeline: Any) -> float | None:
    """The guidance scale the pipeline uses when a call names none: its ``__call__``'s default (SD3's is 7.0).
    Read from the pipeline, so the value an answer reports is the one that was used, whatever the pipeline."""
    parameter = inspect.signature(type(pipeline).__call__).parameters.get("guidance_scale")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return float(parameter.default)
