"""One loader thread: submitted callables run one at a time, in order, on a daemon thread that ends when nothing is
queued (the next submission starts a new one).

Why not a pool: loading runs torch, and a live thread that once ran torch keeps an OpenMP thread team; with more
OpenMP threads alive than cores, libgomp stops spin-waiting and every CPU generation ran ~1.5x slower (bench/
RESULTS.md, api/loading.py ``_in_passing_thread``). A daemon, because a SIGTERM during a load must not wait for it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["LoaderThread"]


class LoaderThread:
    """See the module's docstring. ``submit`` is safe from any thread."""

    def __init__(self, name: str = "model-loader") -> None:
        self.name = name
        self._lock = threading.Lock()  # protects _queue and _alive: a submission never finds a thread about to end
        self._queue: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._alive = False

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Queue ``fn``; the returned future settles with its result or exception."""
        future: Future[Any] = Future()
        with self._lock:
            self._queue.append((fn, future))
            if not self._alive:
                self._alive = True
                threading.Thread(target=self._drain, name=self.name, daemon=True).start()
        return future

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._alive = False
                    return
                fn, future = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)
