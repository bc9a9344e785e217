"""Thread-safe wrappers: transparent, and really serialising."""

from __future__ import annotations

import threading
import time

from utils import ThreadSafeImageProcessorWrapper, ThreadSafeTokenizerWrapper, ThreadSafeVAEWrapper


class OverlapSpy:
    """Counts how many threads are inside its methods at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.max_inside = 0
        self.calls = 0
        self.model_max_length = 77
        self._count_lock = threading.Lock()  # protects the counters, not the spied calls

    def _enter(self) -> None:
        with self._count_lock:
            self.inside += 1
            self.calls += 1
            self.max_inside = max(self.max_inside, self.inside)
        time.sleep(0.002)  # widen the window so that unserialised calls do overlap
        with self._count_lock:
            self.inside -= 1

    def __call__(self, text: str) -> str:
        self._enter()
        return text.upper()

    def batch_decode(self, ids: list[int]) -> list[str]:
        self._enter()
        return [str(i) for i in ids]

    def decode(self, x: object) -> object:
        self._enter()
        return x

    def postprocess(self, x: object) -> object:
        self._enter()
        return x

    def __len__(self) -> int:
        return 42


def _hammer(target, n_threads: int = 8, per_thread: int = 10) -> None:
    barrier = threading.Barrier(n_threads)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            target()

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_spy_sees_overlap_without_a_wrapper() -> None:
    # Proves the spy can detect overlapping calls, so the serialisation checks below can fail.
    spy = OverlapSpy()
    _hammer(lambda: spy("a"))
    assert spy.max_inside > 1


def test_tokenizer_wrapper_serialises_calls_and_is_transparent() -> None:
    spy = OverlapSpy()
    tok = ThreadSafeTokenizerWrapper(spy)
    _hammer(lambda: (tok("a"), tok.batch_decode([1, 2])))
    assert spy.calls == 160
    assert spy.max_inside == 1
    assert tok("abc") == "ABC"
    assert tok.model_max_length == 77
    assert len(tok) == 42
    tok.model_max_length = 10  # writes reach the tokenizer
    assert spy.model_max_length == 10
    assert "OverlapSpy" in repr(tok)


def test_wrappers_share_a_given_lock() -> None:
    spy = OverlapSpy()
    lock = threading.Lock()
    a, b = ThreadSafeTokenizerWrapper(spy, lock), ThreadSafeTokenizerWrapper(spy, lock)
    assert a.lock is b.lock is lock
    _hammer(lambda: (a("x"), b("y")))
    assert spy.max_inside == 1


def test_vae_and_image_processor_wrappers_serialise() -> None:
    spy = OverlapSpy()
    vae = ThreadSafeVAEWrapper(spy)
    proc = ThreadSafeImageProcessorWrapper(spy, vae.lock)
    _hammer(lambda: (vae.decode(1), proc.postprocess(2)))
    assert spy.max_inside == 1
    assert ThreadSafeVAEWrapper(vae).wrapped is spy  # no nesting
