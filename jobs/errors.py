"""The job service's own failures, and what a failed job says.

The job service knows no HTTP: it raises these, and the HTTP layer maps them to its answers in one place
(``api/errors.py``: ``TooManyJobs`` and ``StoreUnavailable`` are 503s with ``Retry-After``).

The backends sort the store's own errors into two kinds, both transient for a job: ``StoreUnavailable`` (the store
cannot be reached, or is loading) and ``StoreRefused``, one of them (the store answers but refuses writes: a full
disk, Redis at ``maxmemory``, ``MISCONF``, ``READONLY``, a read-only file, an I/O error). Anything else is a bug and
stays what it is. How a generation's own
failure (the engine's refusals, a timeout, an unexpected exception) is described to the job's clients is the owner's
choice too: the store is given a ``FailureOf`` when it is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "Failure",
    "FailureOf",
    "StoreFailure",
    "StoreFull",
    "StoreRefused",
    "StoreUnavailable",
    "TooManyJobs",
    "failure_body",
]


class Failure(Protocol):
    """What a failed job says (the error envelope's inner object); raised as is when a job is refused at admission."""

    message: str
    type: str
    param: str | None
    code: str | None


# (the exception a run ended with, its generation, the engine) -> how the job describes it. The exception is the
# engine's (``EngineError``: refused, timed out, out of memory, draining) or any other (an unexpected failure, logged).
FailureOf = Callable[[BaseException, Any, Any], Any]


def failure_body(failure: Failure) -> dict[str, Any]:
    """The failure as a job's ``error`` field shows it (the error envelope's inner object)."""
    return {"message": failure.message, "type": failure.type, "param": failure.param, "code": failure.code}


class TooManyJobs(Exception):
    """The store holds ``--max-jobs`` jobs and none of them may go: unfinished, or finished within ``--job-grace``.

    ``waits``: the finished ones' grace left, in seconds, soonest first (a client may retry when the first ends)."""

    def __init__(self, where: str, held: int, waits: list[float]) -> None:
        unfinished = held - len(waits)
        message = f"The {where} holds {held} jobs, its limit: {unfinished} unfinished"
        if waits:
            message += f", {len(waits)} finished within their --job-grace"
        super().__init__(message + ". Retry later.")
        self.message, self.held, self.waits = message + ". Retry later.", held, waits

    @property
    def retry_after(self) -> int:
        """Whole seconds until the first finished job may go (1 when every job is unfinished)."""
        return math.ceil(self.waits[0]) if self.waits else 1


class StoreUnavailable(Exception):
    """The store cannot be reached now (Redis down, restarting or loading): answered 503, retried in the background.
    Its text says why, never with a file path."""


class StoreRefused(StoreUnavailable):
    """The store answers but refuses writes (a full disk, Redis at ``maxmemory``, ``MISCONF``, ``READONLY``, a
    read-only file, an I/O error): as transient as an unreachable store for a job (answered 503, retried), and told
    apart in the answers and the log, which say why."""


@dataclasses.dataclass(frozen=True)
class StoreFailure:
    """What a job says whose end the store could not take for a reason no retry mends (a ``Failure``; the log has
    the details): it ran, but its outcome is lost."""

    message: str = "The job ran, but its outcome could not be stored in the job store (the server's log says why)."
    type: str = "server_error"
    param: str | None = None
    code: str | None = "job_store_error"


class StoreFull(Exception):
    """A backend's answer to an insert: ``--max-jobs`` records held, none of which may go: ``held``, and the finished
    ones' grace left (the job service raises ``TooManyJobs`` from it)."""

    def __init__(self, held: int, waits: list[float]) -> None:
        super().__init__(f"{held} jobs held")
        self.held, self.waits = held, waits
