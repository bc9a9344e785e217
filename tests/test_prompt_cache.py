"""The prompt cache: right embeddings under 16 threads, each text encoded once, LRU eviction, failures passed on."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from engine.prompt_cache import PromptCache, TextEmbedding, encode_texts
from utils import RequestScopedPipeline

TEXTS = [f"a lighthouse in a storm, number {i}" for i in range(6)] + [""]


def test_sixteen_threads_get_the_right_embeddings_and_each_text_is_encoded_once(tiny_pipeline: Any) -> None:
    view = RequestScopedPipeline(tiny_pipeline).make_view()  # locked tokenizers: safe from many threads
    expected = {t: encode_texts(view, [t])[0] for t in TEXTS}
    cache = PromptCache(64, identity=("random:tiny", "float32", "cpu"))
    encoded: list[str] = []
    lock = threading.Lock()  # protects `encoded`: every thread's misses append to it

    def encode(texts: list[str]) -> list[TextEmbedding]:
        with lock:
            encoded.extend(texts)
        return [encode_texts(view, [t])[0] for t in texts]

    start = threading.Barrier(16)

    def client(i: int) -> list[tuple[str, TextEmbedding]]:
        start.wait(timeout=30)
        texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(5)]
        return list(zip(texts, cache.get(texts, encode), strict=True))

    with ThreadPoolExecutor(16) as pool:
        results = [pair for pairs in pool.map(client, range(16)) for pair in pairs]

    assert len(results) == 80
    for text, embedding in results:
        assert torch.equal(embedding.embeds, expected[text].embeds), text
        assert torch.equal(embedding.pooled, expected[text].pooled), text
    assert sorted(encoded) == sorted(TEXTS), "a text was encoded more than once"
    stats = cache.stats()
    assert stats["misses"] == len(TEXTS) and stats["hits"] == 80 - len(TEXTS), stats
    assert stats["entries"] == len(TEXTS)


def _fake(texts: list[str]) -> list[TextEmbedding]:
    return [TextEmbedding(torch.full((1, 2, 3), float(len(t))), torch.zeros(1, 4)) for t in texts]


def test_least_recently_used_entries_go_first_and_zero_turns_caching_off() -> None:
    cache = PromptCache(2)
    cache.get(["a", "bb"], _fake)
    cache.get(["a"], _fake)  # "a" is now the most recently used
    cache.get(["ccc"], _fake)  # evicts "bb"
    assert cache.stats() == {"capacity": 2, "entries": 2, "hits": 1, "misses": 3}
    cache.get(["a", "bb"], _fake)
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 4

    off = PromptCache(0)
    calls: list[list[str]] = []
    off.get(["x", "x", "y"], lambda texts: calls.append(texts) or _fake(texts))
    off.get(["x"], lambda texts: calls.append(texts) or _fake(texts))
    assert calls == [["x", "y"], ["x"]]
    assert off.stats()["entries"] == 0


def test_the_key_holds_the_sequence_length_and_the_encoders_identity() -> None:
    cache = PromptCache(8, identity=("model-a", "float32", "cpu"))
    other = PromptCache(8, identity=("model-b", "float32", "cpu"))
    assert cache.key("x", 256) != cache.key("x", 77)
    assert cache.key("x", 256) != other.key("x", 256)


def test_a_failed_encoding_is_raised_to_every_waiter_and_not_cached() -> None:
    cache = PromptCache(8)
    release = threading.Event()

    def failing(texts: list[str]) -> list[TextEmbedding]:
        release.wait(10)
        raise RuntimeError("encoder failed")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.get, ["x"], failing)
        while cache.stats()["misses"] == 0:
            threading.Event().wait(0.01)
        second = pool.submit(cache.get, ["x"], _fake)  # waits for the first one's encoding (counted as a hit)
        while cache.stats()["hits"] == 0:
            threading.Event().wait(0.01)
        release.set()
        for future in (first, second):
            with pytest.raises(RuntimeError, match="encoder failed"):
                future.result(timeout=30)
    assert cache.get(["x"], _fake)[0].embeds.shape == (1, 2, 3)  # retried, now cached
    assert cache.stats()["entries"] == 1
