"""The script form's Ray plumbing (``python deploy/ray_serve.py``): a local Ray, one deploy, one clean stop.

Both ends are quiet on a normal run, and that is by construction, not by a log filter:

- start: Serve is started once, with the proxy options, by the deploy of one config (as ``serve run CONFIG`` does).
  ``serve.start(http_options=...)`` followed by ``serve.run`` starts it twice, and the second start logs
  "Connecting to existing Serve app ... New http_options/controller_options will not be applied".
- stop: the app is deleted (its replicas drain, as on a scale-down), then Ray is shut down with everything it runs.
  ``serve.shutdown()`` instead waits on a controller call that only ends when the controller kills itself, which Ray
  reports as "Task ServeController.graceful_shutdown failed ... killed by `ray.kill`" on every clean stop.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ray import serve
from ray.serve.schema import ServeDeploySchema

logger = logging.getLogger(__name__)

__all__ = ["deploy_config", "start_ray", "stop_serving"]

POLL_S = 0.5


def start_ray(ray_cpus: float | None, repo: Path, environment: dict[str, str]) -> bool:
    """A local Ray whose processes import the project from ``repo``; False (said on stderr) where Ray cannot start.

    ``environment``: variables every Ray process must inherit (set here unless already set).
    """
    import ray

    # Inherited by every Ray process this starts: the replicas and the proxy import the project (api, utils, deploy)
    # by name, and the proxy loads deploy.proxy's middleware.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    for name, value in environment.items():
        os.environ.setdefault(name, value)
    try:
        ray.init(
            num_cpus=ray_cpus,
            include_dashboard=False,
            object_store_memory=100 * 1024 * 1024,  # requests carry JSON and images travel as URLs: no big objects
            logging_level=logging.WARNING,
            log_to_driver=False,  # the replicas' logs: /tmp/ray/session_latest/logs/serve/
        )
    except Exception as exc:  # noqa: BLE001 - any reason Ray cannot start here is reported the same way
        print(f"deploy/ray_serve.py: ray could not start: {exc}", file=sys.stderr)
        return False
    return True


def deploy_config(config: ServeDeploySchema, app_name: str) -> None:
    """Start Serve with the config's proxy options, deploy its app, and wait until it runs.

    Raises RuntimeError when the app cannot start (a replica failed to load).
    """
    # Ray's own `serve run CONFIG` path (ray/serve/scripts.py): Serve's start helper returns the client that deploys
    # a config; there is no public call that starts Serve with proxy options and deploys without a second start.
    # requirements-ray.txt pins the release line this was written against.
    from ray.serve._private.api import serve_start

    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    client.deploy_apps(config)
    while True:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the deploy failed: {app.message}")
        time.sleep(POLL_S)


def stop_serving(app_name: str) -> None:
    """Delete the app (its replicas finish their requests, up to --shutdown-timeout), then stop the local Ray."""
    import ray

    try:
        serve.delete(app_name)
    except Exception as exc:  # noqa: BLE001 - never deployed, or Ray already gone: nothing is left to drain
        logger.debug("nothing to delete: %s", exc)
    ray.shutdown()  # the controller and the proxy stop with the cluster
