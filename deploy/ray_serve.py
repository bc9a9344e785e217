"""N replicas of the server behind one endpoint, on Ray Serve.

Each replica is the whole app from the factory (``api.create_app``: the same routes, schemas, error envelope and
headers) with its own model on its own device and its own engine; Ray's proxy spreads requests over the replicas.
Three ways to run it (docs/operations/scaling-out.md):

- ``serve run deploy.ray_serve:build_app model=random:tiny num_replicas=2`` (Ray's application builder);
- ``serve deploy deploy/serve_config.yaml`` on a running cluster;
- ``python deploy/ray_serve.py --model MODEL --num-replicas N --port PORT``: starts a local Ray, serves, and shuts
  everything down on SIGINT or SIGTERM.

What this adds to the app, and only from here: an ``X-Replica`` response header naming the replica that answered, a
lifespan that holds the replica back from traffic until its model has loaded, Ray's health check on the engine's
readiness, each replica's own ``/metrics`` port (``metrics_port``: ``deploy/replica_metrics.py``), and Ray's proxy
options from the server's connection limits (``http_options``; what Ray's proxy cannot enforce is the reverse
proxy's: ``deploy/nginx_config.py``). Backpressure: the engine keeps its own bound (slots + queue, then the 503
envelope with ``Retry-After``); Ray's per-replica limit is that bound plus headroom for cheap requests (image fetches,
probes), so they do not queue behind generations and an overloaded replica answers with the engine's envelope.
Several models (``--model NAME=SOURCE`` more than once): each replica holds some of them in its own budget, and Ray
routes a request to a replica holding its model (Ray Serve's model multiplexing: ``deploy/routing.py`` in the proxy,
``deploy/multiplex.py`` in the replicas).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable, and import this module by name
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.schema import ServeDeploySchema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.settings import Settings, SettingsError, parse_settings
from deploy.cluster import deploy_config, start_ray, stop_serving

logger = logging.getLogger(__name__)

__all__ = [
    "REPLICA_HEADER",
    "SD3Server",
    "Scale",
    "build_app",
    "deployment_options",
    "hold_until_loaded",
    "http_options",
    "main",
    "not_ready_reason",
    "serve_app",
    "serve_config",
]

REPO = Path(__file__).resolve().parent.parent
REPLICA_HEADER = "X-Replica"
# Per-replica requests Ray may send beyond the engine's slots and queue: image fetches, /ready, /api/status. They take
# milliseconds; without headroom a replica whose queue is full would make them wait behind generations.
HEADROOM = 16
PROXY_CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "deploy.proxy:proxy_middlewares"
# Ray's exit status when Ray itself cannot start here (the tests skip on it, saying why; any other failure fails).
EXIT_RAY_UNAVAILABLE = 69
APP_NAME = "sd3"


@dataclass(frozen=True)
class Scale:
    """How many replicas, and what each one reserves. ``max_replicas`` > 0 turns autoscaling on."""

    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float | None = None  # default: the engine's slots (see deployment_options)
    models_per_replica: int = 0  # several models: Ray's max_num_models_per_replica (0: every model; deploy/multiplex)

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.min_replicas < 0 or self.max_replicas < 0 or self.models_per_replica < 0:
            raise ValueError(
                "num_replicas must be at least 1, min_replicas, max_replicas and models_per_replica at least 0"
            )
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must not be negative")
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")


def deployment_options(settings: Settings, scale: Scale) -> dict[str, Any]:
    """Ray Serve options for the replica deployment, derived from the server's settings."""
    from api.loading import default_concurrency, engine_kind

    device_type = "cuda" if scale.num_gpus > 0 else "cpu"
    slots = settings.max_concurrency or default_concurrency(device_type, engine_kind(settings, device_type))
    options: dict[str, Any] = {
        "max_ongoing_requests": slots + settings.max_queue + HEADROOM,
        # Where every replica is at its limit, Ray's router queues; bounded so, too, overload is an immediate 503.
        "max_queued_requests": max(1, settings.max_queue),
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        # In-flight requests finish before a replica stops (scale-down, redeploy), as on SIGTERM in the single server.
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": scale.num_gpus},
    }
    if scale.max_replicas > 0:
        # Busy slots are the engine's full throughput; more ongoing requests than slots only queue. Scale up when,
        # on average, requests start to queue.
        options["autoscaling_config"] = {
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests or slots,
        }
    else:
        options["num_replicas"] = scale.num_replicas
    return options


def http_options(settings: Settings) -> dict[str, Any]:
    """Ray's proxy options: the part of the connection guard (``api.protocol``) that Ray's proxy can enforce.

    Ray's proxy is uvicorn with its default parser: no header-size limit, no deadline on a request's head or body,
    no connection cap. It does close a connection idle between requests (``keep_alive_timeout_s``, whole seconds)
    and bounds a request's whole time in the proxy (``request_timeout_s``): here a backstop past the app's own 504
    (``--request-timeout``, from arrival) plus the time a body and an answer may take, so the app answers first.
    The rest is the reverse proxy's in front (docs/operations/scaling-out.md: which layer enforces what).
    """
    backstop = settings.request_timeout + settings.receive_timeout + settings.send_timeout
    return {
        "host": settings.host,
        "port": settings.port,
        "keep_alive_timeout_s": max(1, math.ceil(settings.keep_alive_timeout)),
        "request_timeout_s": backstop if settings.request_timeout > 0 else None,
    }


class ReplicaHeader:
    """Pure ASGI middleware: names the replica that answered in ``X-Replica`` (an opaque Ray replica id).

    Also drops the app's ``X-Request-ID`` when it is the one Ray's proxy gave the request: the proxy adds that same
    header to every answer, and a client should see it once.
    """

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), name.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (b"x-request-id", dict(scope.get("headers", [])).get(b"x-request-id"))

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if (h[0].lower(), h[1]) != given]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, named)


def not_ready_reason(state: Any) -> str | None:
    """Why the app cannot take work (``loading``, ``load_failed``, ``draining``), or None: /ready's own rule."""
    if state.engine is not None:
        return state.engine.ready_reason
    return "load_failed" if state.load_error is not None else "loading"


def hold_until_loaded(app: Any) -> None:
    """Wrap the app's lifespan so its startup ends only once the model has loaded (or failed to).

    Ray routes to a replica once its startup is done; the single server instead answers 503 ``loading`` meanwhile,
    which behind a proxy with other ready replicas would be a needless error. A failed load fails the startup, and
    Ray starts the replica again.
    """
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with original(target) as state:
            await app.state.load_task
            if app.state.engine is None:
                raise RuntimeError(f"the model failed to load: {app.state.load_error}")
            yield state

    app.router.lifespan_context = lifespan


@serve.deployment(name="SD3Server")
@serve.ingress()
class SD3Server:
    """One replica: the app from ``create_app``, its own model and engine."""

    def __init__(self, settings: dict[str, Any], metrics_port: int = 0, models_per_replica: int = 0) -> None:
        self.settings = Settings(**settings)
        self.metrics_port, self.models_per_replica = metrics_port, models_per_replica
        self.api: Any = None  # the FastAPI app (the wrapper Ray adds owns `app`)
        # The app's own log lines (model ready, requests) in the replica's log, as the single server prints them.
        logging.basicConfig(level=self.settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    def __serve_build_asgi_app__(self) -> Any:
        from api import create_app

        self.api = create_app(self.settings)
        replica = serve.get_replica_context().replica_id.unique_id
        self.api.add_middleware(ReplicaHeader, name=replica)
        hold_until_loaded(self.api)
        if self.settings.several_models:  # requests go to the replicas holding their model (deploy/multiplex.py)
            from deploy.multiplex import multiplex_models

            multiplex_models(self.api, self.models_per_replica)
        if self.metrics_port:
            rank = serve.get_replica_context().rank.local_rank
            _serve_metrics_while_running(self.api, self.settings, self.metrics_port + rank, replica)
        logger.info("replica %s: serving %s", replica, self.settings.model_source)
        return self.api

    def check_health(self) -> None:
        """Ray's health check: the engine's readiness (a replica that fails it is replaced)."""
        reason = not_ready_reason(self.api.state) if self.api is not None else "loading"
        if reason is not None:
            raise RuntimeError(f"replica not ready: {reason}")


def _serve_metrics_while_running(app: Any, settings: Settings, port: int, name: str) -> None:
    """Wrap the app's lifespan so the replica's own metrics port is open for as long as the replica runs."""
    from deploy.replica_metrics import serve_metrics

    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with original(target) as state, serve_metrics(app, settings, port, name):
            yield state

    app.router.lifespan_context = lifespan


def serve_app(settings: Settings, scale: Scale, metrics_port: int = 0) -> Any:
    """The bound Serve application: ``SD3Server`` with options from ``settings`` and ``scale``."""
    # Every replica writes and serves images in one directory, so a URL from any replica is fetchable through any
    # other: an absolute path (a replica's working directory is Ray's, not ours), shared on a cluster (NFS, a volume).
    explicit = settings.model_dump(exclude_unset=True)
    explicit.update(_absolute_paths(settings))
    options = deployment_options(settings, scale)
    return SD3Server.options(**options).bind(explicit, metrics_port, scale.models_per_replica)


def _absolute_paths(settings: Settings) -> dict[str, str]:
    """The data directory, the image directory and a relative SQLite job store made absolute (a replica's working
    directory is Ray's, not ours). Every replica gets the same ``--job-store``: Redis (``redis://host:port/db``) is the
    one for several machines."""
    paths = {name: str(Path(getattr(settings, name)).expanduser().resolve()) for name in ("data_dir", "image_dir")}
    store = str(settings.job_store)
    if store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
        paths["job_store"] = "sqlite:///" + str(Path(store.removeprefix("sqlite:///")).expanduser().resolve())
    return paths


_SCALE_NAMES = {f.name for f in fields(Scale)}
_INT_SCALE = {"num_replicas", "min_replicas", "max_replicas", "models_per_replica"}
_DEPLOY_NAMES = {*_SCALE_NAMES, "metrics_port"}


def build_app(args: dict[str, str]) -> Any:
    """Ray's application builder: ``serve run deploy.ray_serve:build_app model=random:tiny num_replicas=2``.

    ``args``: the Scale fields, ``metrics_port`` (each replica's own /metrics: ``deploy/replica_metrics.py``; 0,
    the default: none), and any server option by its Settings name (``max_queue=16``); validated here, before any
    replica loads a model.
    """
    scale = Scale(**{k: (int if k in _INT_SCALE else float)(v) for k, v in args.items() if k in _SCALE_NAMES})
    settings = Settings(**{k: v for k, v in args.items() if k not in _DEPLOY_NAMES})
    metrics_port = int(args.get("metrics_port", 0))
    if not 0 <= metrics_port <= 65535:
        raise ValueError(f"metrics_port must be a port number (0: none), not {metrics_port}")
    return serve_app(settings, scale, metrics_port)


def serve_config(settings: Settings, scale: Scale, metrics_port: int = 0) -> ServeDeploySchema:
    """The script's deployment as a Serve config (the form of ``deploy/serve_config.yaml``): proxy and app at once.

    One config, deployed once, is what keeps the start quiet: ``serve.start`` followed by ``serve.run`` starts
    Serve twice, and the second start logs that "new http_options will not be applied".
    """
    args: dict[str, Any] = settings.model_dump(exclude_unset=True)
    args.update(_absolute_paths(settings))  # as serve_app: the same directories and store
    args.update({k: v for k, v in vars(scale).items() if v is not None})
    args["metrics_port"] = metrics_port
    app = {"name": APP_NAME, "route_prefix": "/", "import_path": "deploy.ray_serve:build_app", "args": args}
    return ServeDeploySchema(proxy_location="EveryNode", http_options=http_options(settings), applications=[app])


def _parse(argv: list[str] | None) -> tuple[Settings, Scale, int, float | None]:
    parser = argparse.ArgumentParser(
        prog="deploy/ray_serve.py",
        description="Serve N replicas on a local Ray cluster. Every server flag (python serverasync.py --help) "
        "applies to each replica.",
        add_help=False,
        allow_abbrev=False,  # --model is the server's, not short for --models-per-replica
    )
    parser.add_argument("--num-replicas", type=int, default=1, help="replicas (each loads the model once)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (Ray scheduling)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (1 on a GPU machine)")
    parser.add_argument("--max-replicas", type=int, default=0, help="autoscale up to this many (0: fixed)")
    parser.add_argument("--min-replicas", type=int, default=1, help="autoscale down to this many")
    parser.add_argument("--metrics-port", type=int, default=0, help="replica i's own /metrics on this port + i")
    parser.add_argument(
        "--models-per-replica", type=int, default=0, help="several models: how many one replica holds (0: all)"
    )
    parser.add_argument("--ray-cpus", type=float, default=None, help="CPUs the local Ray may use (default: all)")
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
    settings = parse_settings(rest)
    scale = Scale(
        num_replicas=known.num_replicas,
        num_cpus=known.num_cpus,
        num_gpus=known.num_gpus,
        min_replicas=known.min_replicas,
        max_replicas=known.max_replicas,
        models_per_replica=known.models_per_replica,
    )
    return settings, scale, known.metrics_port, known.ray_cpus


def _routes_environment(settings: Settings) -> dict[str, str]:
    """Several models: the names Ray's proxy routes by (``deploy/routing.py``), for the cluster's environment."""
    from deploy.routing import ROUTES_VARIABLE, model_routes

    routes = model_routes(settings)
    return {ROUTES_VARIABLE: routes.to_json()} if routes is not None else {}


class _Stop(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM: leave whatever it was doing (even a deploy) and clean up."""


def _on_signal(signum: int, _frame: Any) -> None:
    # Once only: a second signal must not interrupt the clean-up it started.
    for handled in (signal.SIGINT, signal.SIGTERM):
        signal.signal(handled, lambda *_: logger.warning("already stopping"))
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """The script form: start a local Ray, serve, and on SIGINT/SIGTERM shut Serve and Ray down (exit 0)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings, scale, metrics_port, ray_cpus = _parse(argv)
        config = serve_config(settings, scale, metrics_port)
        build_app(config.applications[0].args)  # what the controller will build, checked before Ray starts
    except SettingsError as exc:
        for line in exc.lines:
            print(f"deploy/ray_serve.py: error: {line}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"deploy/ray_serve.py: error: {exc}", file=sys.stderr)
        return 2
    if not start_ray(ray_cpus, REPO, {PROXY_CALLBACK_VARIABLE: PROXY_CALLBACK, **_routes_environment(settings)}):
        return EXIT_RAY_UNAVAILABLE
    # After ray.init, which installs its own SIGTERM handler (exit at once, status 15).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    status = 0
    try:
        deploy_config(config, APP_NAME)
        url = f"http://{settings.host}:{settings.port}"
        logger.info("serving %s, %d replica(s), at %s", settings.model_source, scale.num_replicas, url)
        threading.Event().wait()
    except _Stop as stop:
        logger.info("%s: stopping; replicas drain for up to %gs", stop, settings.shutdown_timeout)
    except RuntimeError as exc:  # the deploy failed: a replica could not start
        logger.error("%s (replica logs: /tmp/ray/session_latest/logs/serve/)", exc)
        status = 1
    finally:
        stop_serving(APP_NAME)
    return status


if __name__ == "__main__":
    from deploy.ray_serve import main as _main  # the module by name, so Ray pickles its classes by reference

    sys.exit(_main())
