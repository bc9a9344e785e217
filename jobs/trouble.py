"""Store trouble, told once: the job service meets the same error again and again while a store is away or refuses
writes (at every tick, every second), so the log says it once per kind and interval, counts the rest, and says when
it has passed.

A kind is ``unavailable`` or ``refused`` (``jobs.errors``' two kinds of store error, whatever the step that met it),
or, for any other error (a bug), the step and the exception's type: that one is logged with its traceback.
"""

from __future__ import annotations

import logging
import time

from jobs.errors import StoreRefused, StoreUnavailable

__all__ = ["LOG_EVERY_S", "Trouble", "kind_of"]

LOG_EVERY_S = 60.0  # the same kind of trouble is logged at most this often


def kind_of(exc: BaseException, step: str = "") -> str:
    """The kind of trouble ``exc`` is, met by ``step``: ``refused``, ``unavailable``, or ``step: ExceptionType``."""
    if isinstance(exc, StoreRefused):
        return "refused"
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    return f"{step}: {type(exc).__name__}"


class Trouble:
    """The errors met by one activity (``what``: e.g. "the tick"), logged to ``logger`` once per kind per ``every``
    seconds."""

    def __init__(self, logger: logging.Logger, what: str, every: float = LOG_EVERY_S) -> None:
        self.logger, self.what, self.every = logger, what, every
        self._logged: dict[str, float] = {}  # kind -> when it was last logged (monotonic)
        self._unlogged: dict[str, int] = {}  # kind -> how many were met since, not logged

    def report(self, exc: BaseException, step: str, retry_s: float) -> None:
        """Log ``exc`` (met by ``step``; tried again in ``retry_s`` seconds) unless its kind was logged lately."""
        kind, now = kind_of(exc, step), time.monotonic()
        last = self._logged.get(kind)
        if last is not None and now - last < self.every:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        unlogged = self._unlogged.pop(kind, 0)
        self._logged[kind] = now
        again = f"{self.what} goes on every {retry_s:g}s" + (f" ({unlogged} more since last said)" if unlogged else "")
        if kind == "refused":
            self.logger.warning("job store refuses writes (%s); %s", exc, again)
        elif kind == "unavailable":
            self.logger.warning("job store unavailable (%s); %s", exc, again)
        else:
            self.logger.error("%s failed at its %s step; %s", self.what, step, again, exc_info=exc)

    def passed(self) -> None:
        """Everything worked: say so once, if trouble was told."""
        if self._logged:
            self.logger.info("job store works again; %s is back to normal", self.what)
            self._logged.clear()
            self._unlogged.clear()
