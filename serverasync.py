"""The entry point users run: ``python serverasync.py --model random:tiny`` serves offline.

CLI flags -> ``Settings`` (validated before anything loads), the draining uvicorn server, and ``main()``. The HTTP
layer lives in the ``api`` package; ``create_app`` is re-exported here so existing imports keep working. Importing
this module loads nothing: the model is loaded by the app's lifespan (in the background, so ``/health`` answers
and ``/ready`` says 503 meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from api import Settings, create_app, parse_settings
from api.app import stop_requests
from api.loading import engine_kind
from api.protocol import uvicorn_options
from api.settings import SettingsError
from jobs import check_job_store

logger = logging.getLogger("serverasync")

# Exit statuses (docs/operations/exit-codes.md).
EXIT_OK = 0  # stopped by SIGTERM / Ctrl-C after draining
EXIT_LOAD_FAILED = 1  # the model could not be loaded (the log says why, with a hint)
EXIT_BAD_OPTION = 2  # an option is invalid, or cannot work on this machine (no such device, not enough memory)
EXIT_CANNOT_LISTEN = 3  # the address or port cannot be listened on (in use, privileged, not this machine's)
EXIT_INTERRUPTED = 130  # a third Ctrl-C: quit at once, answering nobody (the shell's code for death by SIGINT)

__all__ = ["Settings", "create_app", "main", "parse_settings"]


class _DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._stopping = False  # a second Ctrl-C has ended the drain

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._stopping and sig == signal.SIGINT:
            # The third Ctrl-C: the user wants out now. uvicorn's force-exit would cancel the lifespan into a
            # traceback; nothing is left to answer that the second one did not.
            logger.warning("third interrupt: quitting now")
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
        if self.should_exit and sig == signal.SIGINT and not self._stopping:
            # A second Ctrl-C ends the drain now: every open request is answered 503 "draining" (uvicorn's own
            # force-quit would cancel them into plain-text 500s and tracebacks). A third one quits at once.
            self._stopping = True
            logger.warning("second interrupt: answering open requests 503 and exiting (Ctrl-C again quits at once)")
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to stop
                asyncio.get_running_loop().call_soon_threadsafe(stop_requests, self._app)
            return
        engine = self._app.state.engine
        if engine is not None:
            engine.start_draining()
        if not self.should_exit:
            timeout = self._app.state.settings.shutdown_timeout
            logger.info("signal %d: draining (up to %gs; Ctrl-C again to stop now), then exiting", sig, timeout)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own restores the previous handlers when serving ends and re-raises the signals it caught. These
        # stay: the process may outlive the server (a generation thread stops only at its next step, and the
        # interpreter waits for it), and a Ctrl-C then must still count (the third quits at once, with its line).
        # Nothing is re-raised, so an orderly drain exits 0.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.handle_exit)
        yield

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        # uvicorn waits here for open requests. At --shutdown-timeout every request still open is answered 503
        # "draining" (uvicorn's own, later timeout would cancel them into a plain-text 500).
        timeout = self._app.state.settings.shutdown_timeout
        stop = asyncio.get_running_loop().call_later(timeout, stop_requests, self._app)
        try:
            await super().shutdown(sockets)
        finally:
            stop.cancel()


def main(argv: list[str] | None = None, loader: Callable[[Settings], Any] | None = None) -> int:
    """Run the server; the exit status is one of the ``EXIT_*`` codes (docs/operations/exit-codes.md). ``loader`` as in
    ``create_app`` (default: the model named by ``--model``)."""
    try:
        settings = parse_settings(argv)
    except SettingsError as exc:
        for line in exc.lines:
            print(f"serverasync.py: error: {line}", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_OPTION
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The port first: finding it taken must not wait for anything, least of all a model load.
    try:
        sock = _listen(settings.host, settings.port)
    except OSError as exc:
        print(
            f"serverasync.py: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr
        )  # noqa: T201
        print(f"Hint: {_LISTEN_HINTS.get(exc.errno or 0, 'check --host and --port')}", file=sys.stderr)  # noqa: T201
        return EXIT_CANNOT_LISTEN
    try:
        check_job_store(settings.job_store)  # a file that cannot be a store ends the start here, not at the first job
    except ValueError as exc:
        sock.close()
        print(f"serverasync.py: error: {_store_option(settings)}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_OPTION
    from Pipelines import ModelLoadError, preflight, quiet_library_logs

    quiet_library_logs()
    try:
        # Every model, each alone; the default's answer names the device and dtype.
        options = (settings.device, settings.dtype, settings.load_options)
        checked = {spec.name: preflight(spec.source, *options) for spec in settings.model_specs}
        device, dtype = checked[settings.default_model]
        check_adapters(settings)
    except (ModelLoadError, ValueError) as exc:
        sock.close()
        print(f"serverasync.py: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_OPTION
    _log_start(settings, sock, device, dtype)
    return _serve(settings, sock, create_app(settings, loader))


def _store_option(settings: Settings) -> str:
    """The option that named the job store, as the user would look for it (the default: by the data directory)."""
    if settings.job_store == f"sqlite:///{Path(settings.data_dir) / 'jobs.db'}":
        return f"--job-store {settings.job_store} (the default: jobs.db in --data-dir {settings.data_dir})"
    return f"--job-store {settings.job_store}"


def check_adapters(settings: Settings) -> None:
    """Every --lora file is a readable safetensors file holding LoRA weights (ValueError naming the file, and why):
    a bad one ends the start with exit 2 before the model loads, not after."""
    from api.adapters import check_adapter_file, parse_lora_options

    for entries in settings.loras_by_model().values():
        for name, path in parse_lora_options(entries).items():
            try:
                check_adapter_file(path)
            except ValueError as exc:
                raise ValueError(f"--lora {name}: {exc}") from None


def _serve(settings: Settings, sock: socket.socket, app: FastAPI) -> int:
    """Serve ``app`` on the bound ``sock`` until a signal ends the drain, or a failed load ends it at once."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # uvicorn's start-up lines repeat what _log_start said; its warnings and errors still show.
        log_level="warning" if settings.log_level == "info" else settings.log_level,
        # A backstop only: _DrainingServer.shutdown answers open requests at --shutdown-timeout, each with a 503.
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
    server.run(sockets=[sock])
    if app.state.engine is None and app.state.load_error is None:
        logger.info("stopped while the model was loading; exiting without waiting for the load")
    # A failed load was logged, with its hint, by api.loading.
    return EXIT_LOAD_FAILED if failed else EXIT_OK


_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process uses that port: stop it, or choose another with --port (0 picks a free one)",
    errno.EACCES: "ports below 1024 need privileges: choose a port above 1023 with --port",
    errno.EADDRNOTAVAIL: "that address is not one of this machine's: use --host 127.0.0.1 or --host 0.0.0.0",
}


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket uvicorn will serve on, bound now (before anything loads)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)  # listening, so no other process can take the port meanwhile (uvicorn's backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _log_start(settings: Settings, sock: socket.socket, device: Any, dtype: Any) -> None:
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    logger.info(
        "serving %s on %s as %s (engine: %s) at http://%s:%d; loading the model (GET /ready says when done)",
        ", ".join(f"{s.name}={s.source}" if s.name != s.source else s.source for s in settings.model_specs),
        device,
        str(dtype).removeprefix("torch."),
        engine_kind(settings, device.type),
        host,
        port,
    )
    logger.info("jobs kept in %s; images in %s", settings.job_store, settings.image_dir)
    if settings.host in ("0.0.0.0", "::", "") and not settings.api_key:
        logger.warning(
            "listening on all interfaces with no API key: anyone who can reach this machine can generate images; "
            "set SERVER_API_KEY, or use --host 127.0.0.1 to serve this machine only"
        )


if __name__ == "__main__":
    sys.exit(main())
