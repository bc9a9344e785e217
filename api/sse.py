"""Server-Sent Events: the wire format shared by the jobs' event streams and OpenAI's streamed images.

One event is ``event: <name>`` (optional), ``id: <id>`` (optional), one ``data:`` line of compact JSON, and a blank
line (https://html.spec.whatwg.org/multipage/server-sent-events.html). JSON never contains a raw newline, so one
``data:`` line is always enough for the spec's parser; but many clients split lines as ``str.splitlines`` does (httpx's
``iter_lines`` among them), which also breaks at U+0085, U+2028 and U+2029. JSON escapes the other separators (control
characters) anyway; these three are escaped here too, so every client reads one event's JSON on one line.
``SSE_HEADERS`` keep proxies from buffering or caching a stream.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["SSE_EVENT_SCHEMA", "SSE_HEADERS", "SSE_MEDIA_TYPE", "comment", "sse_event"]

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The line separators of ``str.splitlines`` that ``json.dumps(..., ensure_ascii=False)`` leaves raw.
_ESCAPED_SEPARATORS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
# One event, as OpenAPI describes an event stream's items (the ``schema`` of a text/event-stream before OpenAPI 3.2,
# its ``itemSchema`` from 3.2): the fields of the wire format, ``data`` being the JSON text.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "id": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["data"],
}


def sse_event(data: Any, event: str | None = None, event_id: str | int | None = None) -> bytes:
    """One event, encoded; ``data`` is serialised as JSON."""
    lines = []
    if event is not None:
        lines.append(f"event: {_one_line(event)}")
    if event_id is not None:
        lines.append(f"id: {_one_line(str(event_id))}")
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    # Outside strings JSON is ASCII, so these characters can only sit inside a string, where the escape is the same
    # character to a JSON parser.
    lines.append("data: " + text.translate(_ESCAPED_SEPARATORS))
    return ("\n".join(lines) + "\n\n").encode()


def comment(text: str = "") -> bytes:
    """A comment line: clients ignore it; it keeps idle connections (and proxies) from timing out."""
    return f": {_one_line(text)}\n\n".encode()


def _one_line(text: str) -> str:
    if text.splitlines() not in ([], [text]):
        raise ValueError("an SSE field must be one line")
    return text
