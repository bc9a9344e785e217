"""Prompt embeddings: encoding texts with an SD3 pipeline's three text encoders, and an LRU cache of the results.

One entry per *text* (a prompt or a negative prompt), not per (prompt, negative prompt) pair: SD3 encodes the
negative prompt with the same encoders and the same code as the prompt (``encode_prompt``), so the embedding of a
text does not depend on which side of the guidance it stands on. Keyed per text, the empty negative prompt that
most requests share is encoded once. The key also holds everything else that changes an embedding: the maximum
T5 sequence length and the identity of the encoders (model, dtype, device, whether T5 is loaded, how the encoders
are quantized): what produced the embeddings.

The text encoders may live on another device than the transformer (``--encoders-device``): texts are encoded there,
cached there, and each request's embeddings move to the transformer's device (``request_embeddings``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PromptCache", "TextEmbedding", "encode_texts", "encoders_device", "is_guided", "request_embeddings"]


@dataclass(frozen=True)
class TextEmbedding:
    """One text's embeddings, batch dimension 1: the sequence (CLIP + T5) and the pooled (CLIP) vectors."""

    embeds: torch.Tensor
    pooled: torch.Tensor


def encoders_device(pipe: Any) -> torch.device | None:
    """The device the pipeline's text encoders are on (None: it has none)."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            return next(module.parameters()).device
    return None


def encode_texts(
    pipe: Any, texts: Sequence[str], device: Any = None, max_sequence_length: int = 256
) -> list[TextEmbedding]:
    """Encode ``texts`` in one batch with the pipeline's own ``encode_prompt`` (so the math is diffusers'), on the
    encoders' device (``device`` is where the transformer is: the embeddings move there per request)."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(texts),
            prompt_2=None,
            prompt_3=None,
            device=encoders_device(pipe) or device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
    # Cloned: a slice would keep the whole batch's storage alive for as long as one entry stays cached.
    return [TextEmbedding(embeds[i : i + 1].clone(), pooled[i : i + 1].clone()) for i in range(len(texts))]


def is_guided(request: Any) -> bool:
    """Whether the pipeline runs classifier-free guidance for ``request`` (its default guidance_scale is 7.0)."""
    return request.guidance_scale is None or request.guidance_scale > 1


def request_embeddings(
    positive: TextEmbedding, negative: TextEmbedding | None, num_images: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's transformer conditioning, laid out as the pipeline lays it out: ``num_images`` copies of the
    negative half first (only when guiding), then ``num_images`` copies of the prompt; on ``device`` when given."""
    halves = ([negative] if negative is not None else []) + [positive]
    embeds = torch.cat([h.embeds.expand(num_images, -1, -1) for h in halves])
    pooled = torch.cat([h.pooled.expand(num_images, -1) for h in halves])
    if device is not None:
        embeds, pooled = embeds.to(device), pooled.to(device)
    return embeds, pooled


Encoder = Callable[[list[str]], list[TextEmbedding]]


class PromptCache:
    """A thread-safe LRU of ``TextEmbedding`` keyed on (text, ``identity``); ``capacity`` 0 turns caching off.

    Concurrent requests for a text being encoded wait for that encoding instead of starting their own, so under
    any interleaving each text is encoded once while it stays cached (counted as one miss; the waiters are hits).
    """

    def __init__(self, capacity: int, identity: Hashable = ()) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.identity = identity
        # Protects _entries, _pending and the counters: every slot thread (or the encoder thread) looks texts up.
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, TextEmbedding] = OrderedDict()
        self._pending: dict[Hashable, Future[TextEmbedding]] = {}
        self.hits = 0
        self.misses = 0

    def key(self, text: str, max_sequence_length: int) -> Hashable:
        return (text, max_sequence_length, self.identity)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"capacity": self.capacity, "entries": len(self._entries), "hits": self.hits, "misses": self.misses}

    def get(self, texts: Sequence[str], encode: Encoder, max_sequence_length: int = 256) -> list[TextEmbedding]:
        """The embeddings of ``texts``: cached ones at once, the others from one ``encode`` call for all of them."""
        if self.capacity == 0:
            unique = list(dict.fromkeys(texts))
            found = dict(zip(unique, encode(unique), strict=True))
            return [found[t] for t in texts]
        waits: dict[str, Future[TextEmbedding]] = {}
        mine: dict[str, Future[TextEmbedding]] = {}
        with self._lock:
            for text in dict.fromkeys(texts):
                key = self.key(text, max_sequence_length)
                if key in self._entries:
                    self._entries.move_to_end(key)
                    done: Future[TextEmbedding] = Future()
                    done.set_result(self._entries[key])
                    waits[text] = done
                    self.hits += 1
                elif key in self._pending:
                    waits[text] = self._pending[key]
                    self.hits += 1
                else:
                    waits[text] = mine[text] = self._pending[key] = Future()
                    self.misses += 1
        if mine:
            self._encode_mine(mine, encode, max_sequence_length)
        return [waits[t].result() for t in texts]

    def _encode_mine(self, mine: dict[str, Future[TextEmbedding]], encode: Encoder, max_sequence_length: int) -> None:
        texts = list(mine)
        try:
            results = encode(texts)
        except BaseException as exc:
            with self._lock:
                for text in texts:
                    self._pending.pop(self.key(text, max_sequence_length), None)
            for future in mine.values():
                future.set_exception(exc)
            raise
        with self._lock:
            for text, embedding in zip(texts, results, strict=True):
                key = self.key(text, max_sequence_length)
                self._pending.pop(key, None)
                self._entries[key] = embedding
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        for text, embedding in zip(texts, results, strict=True):
            mine[text].set_result(embedding)
