"""Each replica's own ``/metrics`` on its own port, so Prometheus scrapes every replica as a target of its own.

Through Ray's proxy, ``GET /metrics`` answers from whichever replica the router picks: one scrape target would read
one replica's counters, then the other's (a counter that jumps back and forth, which ``rate()`` reads as resets).
Prometheus expects one target per process, told apart by its ``instance`` label, and sums across them in PromQL
(``sum(rate(sd_requests_total[5m]))``). So with ``metrics_port`` set, the replica that is the ``i``-th of its
deployment on its node also serves the app's ``/metrics``, and nothing else, on ``metrics_port + i`` of that node
(Ray's node-local replica rank: a replacement takes the rank, so the port, of the replica it replaces).

The port is served by uvicorn with the server's own connection guard (``api.protocol``) and the app's own route, so
``--metrics-auth``, the OpenMetrics negotiation and the ``X-Replica`` header are the same as through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from api.protocol import uvicorn_options
from api.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["METRICS_PATH", "MetricsOnly", "serve_metrics"]

METRICS_PATH = "/metrics"


class MetricsOnly:
    """Pure ASGI: ``GET``/``HEAD /metrics`` go to the app; every other request is a 404 in the error envelope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == METRICS_PATH and scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            refusal = error_response(404, "This port serves GET /metrics only.", "not_found_error", None, "not_found")
            await refusal(scope, receive, send)


class _ReplicaServer(uvicorn.Server):
    """uvicorn that leaves the process's signals alone: in a replica they are Ray's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    # Bound here, not by uvicorn: uvicorn answers a bind failure with sys.exit, which in a task would stop the
    # replica's event loop; an OSError here fails the replica's start-up, and Ray reports and retries it.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


@contextlib.asynccontextmanager
async def serve_metrics(app: Any, settings: Settings, port: int, name: str) -> AsyncIterator[None]:
    """Serve ``app``'s ``/metrics`` on ``settings.host:port`` while the context is open."""
    sock = _bind(settings.host, port)
    config = uvicorn.Config(
        MetricsOnly(app),
        lifespan="off",  # the app's lifespan is the replica's, already running
        access_log=False,
        log_config=None,
        log_level="warning",
        **uvicorn_options(settings),
    )
    server = _ReplicaServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    logger.info("replica %s: metrics at http://%s:%d%s", name, settings.host, port, METRICS_PATH)
    try:
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()
