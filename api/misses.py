"""Requests for a path no route answers (404) or with a method it does not take (405), and requests refused for a
missing or wrong API key (401), logged: a client configured for the wrong URL, API or key ("Failed to connect" on
its side) then shows in this server's log, at the default level.

Rate-limited as the connection guard's refusals are (``api.protocol``): the first at once, then at most one line
every ``every`` seconds with the count since the previous line and the latest request, the rest of a burst when its
period ends. A scanner probing thousands of paths costs a line every few seconds. The path is cut to 120 characters
and logged with ``%r`` (control characters escaped), never the query string.
"""

from __future__ import annotations

import asyncio
import logging
import time

logger = logging.getLogger(__name__)

__all__ = ["MissLog"]


class MissLog:
    """One app's log of one kind of unanswered request, ``what`` (see the module's notes). Used on the event loop
    only."""

    def __init__(self, what: str, every: float = 5.0) -> None:
        self.what, self.every = what, every
        self.count = 0
        self.latest = ""
        self.last = -every  # no line yet: the first miss is logged at once
        self._flush: asyncio.TimerHandle | None = None

    def note(self, status: int, method: str, path: str) -> None:
        """Count one request answered ``status``."""
        self.count += 1
        self.latest = f"{status} for {method[:16]} {path[:120]!r}"
        now = time.monotonic()
        if now - self.last >= self.every:
            self._report(now)
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.last + self.every - now, self._flush_pending)

    def _flush_pending(self) -> None:
        self._flush = None
        if self.count:
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        if self.count == 1:
            logger.info("%s: answered %s", self.what, self.latest)
        else:
            since = "requests since the last report, the latest"
            logger.info("%s: answered %d %s %s", self.what, self.count, since, self.latest)
        self.count, self.last = 0, now
