"""Each task's diffusers pipeline class, over the loaded pipeline's weights: what both runners make views of."""

from __future__ import annotations

import inspect
import threading
from typing import Any

from utils import RequestScopedPipeline

__all__ = ["TaskPipelines"]


class TaskPipelines:
    """The ``RequestScopedPipeline`` each task's pipeline class runs on, all over the loaded pipeline's weights."""

    def __init__(self, scoped: RequestScopedPipeline) -> None:
        self.scoped = scoped
        self._by_class: dict[str, RequestScopedPipeline] = {}
        # Protects _by_class: two slot threads asking for a new class at once must build it once, not twice.
        self._lock = threading.Lock()

    def get(self, class_name: str) -> RequestScopedPipeline:
        """The scoped pipeline of diffusers' ``class_name``: the loaded one when it is of that class (or a subclass),
        else one built on first use from the loaded one's components."""
        with self._lock:
            found = self._by_class.get(class_name)
            if found is None:
                import diffusers

                cls = getattr(diffusers, class_name)
                if isinstance(self.scoped.pipeline, cls):
                    found = self.scoped
                else:
                    pipeline = _same_components(cls, self.scoped.pipeline)
                    # The same tokenizer objects as the loaded pipeline's, so the same lock must guard them.
                    found = RequestScopedPipeline(pipeline, tokenizer_lock=self.scoped.tokenizer_lock)
                self._by_class[class_name] = found
            return found


def _same_components(cls: type, base: Any) -> Any:
    """A pipeline of class ``cls`` holding ``base``'s own components (the same objects).

    Not ``cls.from_pipe(base)``: it ends with ``.to(dtype)``, float32 unless told otherwise, which casts the shared
    modules in place (a bfloat16 model would be turned into float32 under every request), and even with the loaded
    dtype it would cast the modules kept in float32 on purpose (T5's ``wo`` layers in a float16 load)."""
    accepted = inspect.signature(cls.__init__).parameters
    pipeline = cls(**{name: module for name, module in base.components.items() if name in accepted})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
