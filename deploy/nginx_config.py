"""The reverse proxy in front of Ray Serve: ``deploy/nginx/sd3.conf.template`` rendered with the server's limits.

Ray's proxy bounds only idle keep-alive time and a request's whole time (``deploy.ray_serve.http_options``); the
header-size limit, the head's deadline, the idle limit before a first request, the connection cap, the send timeout
and the body limit of the single server (``api/protocol.py``, ``--max-body-bytes``) are nginx's here, with the same
values: the limits are read from the same ``Settings`` (flags and ``SERVER_*`` variables), never retyped.

    python deploy/nginx_config.py --listen 0.0.0.0:80 --upstream 127.0.0.1:8000 [server flags] > nginx.conf
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.errors import envelope
from api.routes import UPLOAD_PATHS
from api.settings import Settings, SettingsError, parse_settings

__all__ = ["TEMPLATE", "main", "nginx_values", "render"]

TEMPLATE = Path(__file__).resolve().parent / "nginx" / "sd3.conf.template"
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Sockets beyond the cap that a worker keeps for idle keep-alive clients and its own upstream connections.
SPARE_SOCKETS = 256


def _seconds(value: float) -> int:
    # nginx's time values are whole units here; rounding up never makes a limit stricter than the server's.
    return max(1, math.ceil(value))


def _body(message: str, type_: str, code: str) -> str:
    text = json.dumps(envelope(message, type_, None, code))
    # Inside an nginx single-quoted string, where `$` would start a variable and `'` or `\` end or escape it.
    if any(c in text for c in "$'\\"):
        raise ValueError(f"an error body nginx cannot hold verbatim: {text}")
    return text


def nginx_values(settings: Settings, listen: str, upstreams: Sequence[str]) -> dict[str, str]:
    """The template's values: the server's limits in nginx's units, and the JSON error bodies."""
    if not upstreams:
        raise ValueError("at least one upstream (a Ray Serve proxy, host:port) is needed")
    limit, wait = settings.max_header_bytes, _seconds(settings.receive_timeout)
    # No --request-timeout (0): a day, nginx's read timeout being always on.
    upstream_s = settings.request_timeout + settings.receive_timeout if settings.request_timeout else 86_400
    return {
        "listen": listen,
        "upstream_servers": "\n".join(f"        server {u};" for u in upstreams),
        "worker_connections": str(2 * settings.max_connections + SPARE_SOCKETS),
        "worker_rlimit_nofile": str(2 * (2 * settings.max_connections + SPARE_SOCKETS)),
        "max_connections": str(settings.max_connections),
        "max_header_bytes": str(limit),
        # One deadline covers both the idle time before a first request and its head: the stricter of the two.
        "header_timeout": str(_seconds(min(settings.keep_alive_timeout, settings.receive_timeout))),
        "receive_timeout": str(wait),
        "keep_alive_timeout": str(_seconds(settings.keep_alive_timeout)),
        "send_timeout": str(_seconds(settings.send_timeout)),
        "max_body_bytes": str(settings.max_body_bytes),
        "max_upload_bytes": str(settings.max_upload_bytes),
        "upload_paths": "|".join(re.escape(path) for path in sorted(UPLOAD_PATHS)),
        "upstream_timeout": str(_seconds(upstream_s)),
        "body_431": _body(
            f"The request line and headers are larger than {limit} bytes.", "invalid_request_error", "too_large"
        ),
        "body_400": _body("Malformed HTTP request.", "invalid_request_error", "bad_request"),
        "body_408": _body(f"The request was not received within {wait}s.", "timeout_error", "timeout"),
        "body_413": _body(
            f"The request body is too large (limits: {settings.max_body_bytes} bytes; routes that take images: "
            f"{settings.max_upload_bytes} bytes).",
            "invalid_request_error",
            "too_large",
        ),
        "body_503": _body("Too many open connections; retry later.", "overloaded_error", "too_many_connections"),
        "body_502": _body("The server behind this proxy is not answering; retry.", "unavailable", "unavailable"),
        "body_504": _body("The server behind this proxy did not answer in time.", "timeout_error", "timeout"),
    }


def render(settings: Settings, listen: str, upstreams: Sequence[str], template: Path = TEMPLATE) -> str:
    """The nginx configuration for ``settings``' limits, listening on ``listen``, proxying to ``upstreams``."""
    values = nginx_values(settings, listen, upstreams)
    unknown = set(PLACEHOLDER.findall(template.read_text())) - set(values)
    if unknown:
        raise ValueError(f"{template.name}: no value for {sorted(unknown)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template.read_text())


def main(argv: list[str] | None = None) -> int:
    """Print the configuration: ``--listen``, ``--upstream`` (repeatable) and any server flag for the limits."""
    parser = argparse.ArgumentParser(
        prog="deploy/nginx_config.py",
        description="Print an nginx configuration with the server's edge limits, in front of Ray Serve. Every "
        "server flag (python serverasync.py --help) is accepted; the connection limits are the ones used.",
    )
    parser.add_argument("--listen", default="0.0.0.0:80", help="nginx's listen address (default: 0.0.0.0:80)")
    parser.add_argument("--upstream", action="append", help="a Ray Serve proxy, host:port (repeat for each node)")
    known, rest = parser.parse_known_args(argv)
    try:
        settings = parse_settings(rest)
        text = render(settings, known.listen, known.upstream or ["127.0.0.1:8000"])
    except SettingsError as exc:
        for line in exc.lines:
            print(f"deploy/nginx_config.py: error: {line}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"deploy/nginx_config.py: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
