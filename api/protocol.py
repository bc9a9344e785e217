"""The HTTP connection guard: uvicorn's h11 protocol with limits, so one hostile client cannot hurt the others.

uvicorn's default parser (httptools) has no header-size limit: a 128 MB header took 16 s to answer and stalled
every other client, and uvicorn has no time limit on receiving a request or on sending a response. This protocol
is uvicorn's pure-Python h11 one (which bounds the request line and headers) plus, per connection:

- a header-size limit answered ``431``, on every request head: h11's ``max_incomplete_event_size`` bounds a head
  still arriving (an oversized one costs at most one read before the connection is answered and closed), and
  ``handle_events`` measures a head that arrived whole in one read, which h11 would otherwise parse whatever its size;
- an idle limit before the first request (uvicorn's keep-alive timeout only starts after a response);
- a time limit on receiving a whole request, headers and body, from its first byte (slow senders get ``408``);
- a send timeout: a client that stops reading is disconnected once the transport has been paused that long, so
  its response no longer pins memory;
- a cap on open connections: the ones beyond it are answered ``503`` on their first request and closed.

Every answer the server gives by itself is in the API's JSON error envelope, and refusals are logged (at most one
line per kind every few seconds, each with the count since the last, the rest of a burst when its period ends: a
flood cannot flood the log, and its size is always told).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.errors import envelope, error_response
from api.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["ConnectionLimits", "protocol_class", "uvicorn_options"]

# File descriptors kept free for everything that is not a client connection: model files, image writes, logs.
FD_RESERVE = 128
# An over-cap connection gets this long to send its request before it is closed.
OVER_CAP_IDLE_S = 1.0
_HEAD_END = re.compile(rb"\n\r?\n")
REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits one connection is held to (see the module's notes)."""

    max_header_bytes: int
    receive_timeout: float
    keep_alive_timeout: float
    max_connections: int
    send_timeout: float


class _Tally:
    """Counts refusals of one kind and logs them at most once per ``every`` seconds, each line with the count since
    the previous one. What is counted after a line is logged when its period ends, so a burst is always reported
    whole: 50 idle sockets closed at once give a line for the first and one, ``every`` seconds later, for the 49."""

    def __init__(self, what: str, every: float = 5.0) -> None:
        self.what, self.every = what, every
        self.count = 0
        self.last = -every  # no line yet: the first refusal is logged at once
        self._flush: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count one refusal (on the event loop ``loop``, which runs the deferred line)."""
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            self._report(now)
        elif self._flush is None:
            self._flush = loop.call_later(self.last + self.every - now, self._flush_pending)

    def _flush_pending(self) -> None:
        self._flush = None
        if self.count:
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        logger.warning("%s (%d since the last report)", self.what, self.count)
        self.count, self.last = 0, now


@dataclass
class _Tallies:
    """One server's refusal counters (a server's own: several servers in one process never mix their counts)."""

    over_cap: _Tally = field(default_factory=lambda: _Tally("too many open connections: answered 503 and closed"))
    slow_senders: _Tally = field(
        default_factory=lambda: _Tally("request not received within --receive-timeout: answered 408 and closed")
    )
    idle: _Tally = field(default_factory=lambda: _Tally("connection sent nothing within --keep-alive-timeout: closed"))
    non_readers: _Tally = field(
        default_factory=lambda: _Tally("client did not read its response within --send-timeout: connection closed")
    )
    malformed: _Tally = field(
        default_factory=lambda: _Tally("malformed or oversized request head: answered 400/431 and closed")
    )


def envelope_bytes(status: int, message: str, type_: str, code: str) -> bytes:
    """A complete HTTP/1.1 response in the error envelope, with ``Connection: close``."""
    body = json.dumps(envelope(message, type_, None, code)).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def _over_cap_app(scope: Any, receive: Any, send: Any) -> None:
    refusal = error_response(
        503,
        "Too many open connections; retry later.",
        "overloaded_error",
        code="too_many_connections",
        **{"Retry-After": "1", "Connection": "close"},
    )
    await refusal(scope, receive, send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol held to ``limits``, its refusals counted in ``tallies`` (class attributes: see
    ``protocol_class``)."""

    limits: ConnectionLimits
    tallies: _Tallies

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard: asyncio.TimerHandle | None = None  # the idle or the receive deadline, whichever applies
        self._receiving = False
        self._send_guard: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes received, where a head's blank line may begin
        self._measure_head = False  # a whole head may be buffered: measure it before h11 parses it
        self._over_cap = len(self.connections) > self.limits.max_connections
        if self._over_cap:
            self.tallies.over_cap.note(self.loop)
            self.app = _over_cap_app
        idle = OVER_CAP_IDLE_S if self._over_cap else self.limits.keep_alive_timeout
        self._guard = self.loop.call_later(idle, self._idle_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_guards()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._receiving and self._guard is not None:
            self._guard.cancel()  # the idle deadline: the request has begun
            self._guard = None
        # A head can only have become whole in this read if its blank line is in it (or straddles the previous read's
        # end): only then is the buffer measured, so a head trickled in byte by byte costs no rescans.
        window = self._tail + data
        self._tail = window[-2:]
        self._measure_head = self._measure_head or _HEAD_END.search(window) is not None
        super().data_received(data)
        self._watch_receive()

    def on_response_complete(self) -> None:
        self._measure_head = True  # a pipelined head may be buffered whole already: uvicorn parses it next
        self._stop_receiving()  # a response sent before its request was complete (e.g. 413) ends the wait too
        super().on_response_complete()
        self._watch_receive()  # a pipelined request may have been half-buffered meanwhile

    def _watch_receive(self) -> None:
        """Arm the receive deadline while a request is arriving, disarm it once it has arrived."""
        if self.transport.is_closing():
            self._cancel_guards()
            return
        state = self.conn.their_state
        arriving = state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))
        if arriving and not self._receiving:
            # The deadline runs from the request's first byte and is never pushed back by a trickle.
            self._receiving = True
            self._guard = self.loop.call_later(self.limits.receive_timeout, self._receive_expired)
        elif not arriving and self._receiving:
            self._stop_receiving()

    def handle_events(self) -> None:
        # uvicorn parses the buffered bytes here, on new data and after a response (a pipelined request): a head
        # that is whole in the buffer is measured before h11 parses it.
        if self._measure_head and self.conn.their_state is h11.IDLE:
            self._measure_head = False
            if _head_length(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
                self._refuse_head()
                return
        super().handle_events()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this for anything h11 refuses; the buffered head tells an oversized one from a malformed one.
        self._refuse_head()

    def _refuse_head(self) -> None:
        self.tallies.malformed.note(self.loop)
        if _head_length(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            reply = envelope_bytes(
                431,
                f"The request line and headers are larger than {limit} bytes.",
                "invalid_request_error",
                "too_large",
            )
        else:
            reply = envelope_bytes(400, "Malformed HTTP request.", "invalid_request_error", "bad_request")
        self._reply_and_close(reply)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_guard is None:
            self._send_guard = self.loop.call_later(self.limits.send_timeout, self._send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_guard is not None:
            self._send_guard.cancel()
            self._send_guard = None

    def _idle_expired(self) -> None:
        self._guard = None
        if not self.transport.is_closing():
            self.tallies.idle.note(self.loop)
            self.transport.close()

    def _receive_expired(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        self.tallies.slow_senders.note(self.loop)
        if self.cycle is not None and not self.cycle.response_complete:
            # The app may be waiting for the rest of the body: it now reads a disconnect, and anything it sends is
            # dropped (the connection is gone as far as it is concerned).
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        started = self.cycle is not None and self.cycle.response_started
        if started:
            self.transport.close()
        else:
            limit = self.limits.receive_timeout
            self._reply_and_close(
                envelope_bytes(408, f"The request was not received within {limit:g}s.", "timeout_error", "timeout")
            )

    def _send_expired(self) -> None:
        self._send_guard = None
        if not self.transport.is_closing():
            self.tallies.non_readers.note(self.loop)
        # abort, not close: close would wait to flush the very buffer the client is not reading.
        self.transport.abort()

    def _reply_and_close(self, reply: bytes) -> None:
        self.transport.write(reply)
        self.transport.close()
        self._cancel_guards()

    def _stop_receiving(self) -> None:
        self._receiving = False
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _cancel_guards(self) -> None:
        self._stop_receiving()
        if self._send_guard is not None:
            self._send_guard.cancel()
            self._send_guard = None


def _head_length(buffered: bytes) -> int:
    """The length of the request head at the start of ``buffered``: up to and with its blank line (CRLF or a bare LF,
    as h11 reads it), or all of it if incomplete."""
    end = _HEAD_END.search(buffered)
    return end.end() if end else len(buffered)


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class bound to ``limits`` (uvicorn instantiates the class it is given, so the limits ride on it)."""
    return type("BoundGuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "tallies": _Tallies()})


def open_file_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (up to the hard limit); return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The ``uvicorn.Config`` options that make ``settings``' connection limits real."""
    fd_limit = open_file_limit(settings.max_connections + FD_RESERVE)
    # The cap leaves FD_RESERVE descriptors free, so an image write never fails with "Too many open files".
    max_connections = max(1, min(settings.max_connections, fd_limit - FD_RESERVE))
    if max_connections < settings.max_connections:
        logger.warning(
            "--max-connections %d lowered to %d: the open-file limit is %d",
            settings.max_connections,
            max_connections,
            fd_limit,
        )
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        receive_timeout=settings.receive_timeout,
        keep_alive_timeout=settings.keep_alive_timeout,
        max_connections=max_connections,
        send_timeout=settings.send_timeout,
    )
    return {
        "http": protocol_class(limits),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_timeout,
    }
