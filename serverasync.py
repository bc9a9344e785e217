"""The entry point users run: ``python serverasync.py --model random:tiny`` serves offline.

CLI flags -> ``Settings`` (validated before anything loads), the draining uvicorn server, and ``main()``. The HTTP
layer lives in the ``api`` package; ``create_app`` is re-exported here so existing imports keep working. Importing
this module loads nothing: the model is loaded by the app's lifespan (in the background, so ``/health`` answers
and ``/ready`` says 503 meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from api import Settings, create_app, parse_settings
from api.errors import param_of
from api.protocol import uvicorn_options

logger = logging.getLogger("serverasync")

__all__ = ["Settings", "create_app", "main", "parse_settings"]


class _DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        engine = self._app.state.engine
        if engine is not None:
            engine.start_draining()
        logger.info("signal %d: draining (up to %gs), then exiting", sig, self._app.state.settings.shutdown_timeout)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        # uvicorn waits here for open requests. At --shutdown-timeout the engine aborts the ones still running, so
        # each gets a 503 envelope (uvicorn's own, later timeout would cancel them into a plain-text 500).
        engine = self._app.state.engine
        timeout = self._app.state.settings.shutdown_timeout
        abort = asyncio.get_running_loop().call_later(timeout, engine.abort) if engine is not None else None
        try:
            await super().shutdown(sockets)
        finally:
            if abort is not None:
                abort.cancel()


def main(argv: list[str] | None = None, loader: Callable[[Settings], Any] | None = None) -> int:
    """Parse the flags, serve until a signal, drain; return the exit status. ``loader`` as in ``create_app``."""
    from pydantic import ValidationError

    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        for error in exc.errors():
            # Name the flag the user typed (--max-queue); cross-field checks have no field, so no prefix.
            name = param_of(tuple(error["loc"]))
            where = f"--{name.replace('_', '-')}: " if name else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            print(f"serverasync.py: error: {where}{message}", file=sys.stderr)  # noqa: T201
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = create_app(settings, loader)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # A backstop only: _DrainingServer.shutdown aborts requests at --shutdown-timeout, each with a 503 envelope.
        # (Never `int(t) or None`: 0.5 would become None, which waits forever.)
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,
        access_log=settings.log_level == "debug",
        # The h11 protocol held to the connection limits (header size, receive/send/idle timeouts, connection cap).
        **uvicorn_options(settings),
    )
    server = _DrainingServer(config, app)
    failed = False

    def fatal() -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    app.state.on_fatal = fatal
    # uvicorn re-raises the signal that stopped it once it is done; an orderly drain (SIGTERM, or Ctrl-C) should
    # exit 0, so the re-raised signal lands on this no-op handler instead of the default one that kills the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if app.state.engine is None and app.state.load_error is None:
        logger.info("stopped while the model was loading; exiting without waiting for the load")
    if failed:
        error = app.state.load_error
        print(f"serverasync.py: {error}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
