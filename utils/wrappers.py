"""Thread-safe, otherwise transparent wrappers for pipeline parts that are not safe to share between threads.

Hugging Face's Rust tokenizers keep padding/truncation settings inside a Rust object that is mutably borrowed
during encoding; two threads encoding at once raise ``RuntimeError: Already borrowed``. The wrappers below hold a
lock around the calls that touch such state and forward everything else untouched.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "LockedProxy",
    "ThreadSafeImageProcessorWrapper",
    "ThreadSafeTokenizerWrapper",
    "ThreadSafeVAEWrapper",
    "TiledVAE",
]

Lock = Any  # threading.Lock / RLock / anything with the context-manager protocol


class LockedProxy:
    """Forward every attribute to ``wrapped``; hold ``lock`` while calling it or one of ``locked_methods``."""

    locked_methods: frozenset[str] = frozenset()

    def __init__(self, wrapped: Any, lock: Lock | None = None) -> None:
        if isinstance(wrapped, LockedProxy):
            wrapped = wrapped.wrapped
        object.__setattr__(self, "wrapped", wrapped)
        object.__setattr__(self, "lock", lock if lock is not None else threading.Lock())

    def __getattr__(self, name: str) -> Any:
        if name in ("wrapped", "lock"):
            raise AttributeError(name)
        value = getattr(self.wrapped, name)
        if name in self.locked_methods and callable(value):
            return self._locked(value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.wrapped, name, value)

    def _locked(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return fn(*args, **kwargs)

        return call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return self.wrapped(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.wrapped)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.wrapped!r})"


class ThreadSafeTokenizerWrapper(LockedProxy):
    """A tokenizer whose encoding and decoding calls are serialised by a lock."""

    locked_methods = frozenset(
        {
            "encode",
            "encode_plus",
            "batch_encode_plus",
            "decode",
            "batch_decode",
            "tokenize",
            "pad",
            "convert_ids_to_tokens",
            "convert_tokens_to_ids",
            "apply_chat_template",
        }
    )


class ThreadSafeVAEWrapper(LockedProxy):
    """A VAE whose encode/decode run one at a time (bounds the memory peak of concurrent decodes on a GPU)."""

    locked_methods = frozenset({"encode", "decode", "forward", "tiled_encode", "tiled_decode"})


class ThreadSafeImageProcessorWrapper(LockedProxy):
    """An image processor whose pre/post-processing calls are serialised."""

    locked_methods = frozenset({"preprocess", "postprocess", "resize", "normalize", "denormalize"})


class TiledVAE:
    """A VAE whose ``decode`` is diffusers' tiled decode, for one request's view; everything else is the shared VAE.

    Why not ``vae.enable_tiling()``: it sets ``use_tiling`` on the shared module, so every request running at once
    would tile (or stop tiling) with it. This proxy decides per view and leaves the module alone. Its decode is
    exactly what ``AutoencoderKL.decode`` does with tiling on (``_decode``: ``tiled_decode`` once the latents are
    larger than a tile, the plain decoder below that; slicing aside, which the server never turns on).
    """

    def __init__(self, vae: Any) -> None:
        object.__setattr__(self, "wrapped", vae)

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.wrapped, name, value)

    def decode(self, z: Any, return_dict: bool = True, generator: Any = None) -> Any:
        vae = self.wrapped
        inner = getattr(vae, "wrapped", vae)  # the module under a lock wrapper, for its tile size
        tile = inner.tile_latent_min_size
        if z.shape[-1] > tile or z.shape[-2] > tile:
            return vae.tiled_decode(z, return_dict=return_dict)
        return vae.decode(z, return_dict=return_dict)

    def __repr__(self) -> str:
        return f"TiledVAE({self.wrapped!r})"
