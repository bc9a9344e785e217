"""Scale-out by model, the replica's half: Ray Serve's ``@serve.multiplexed`` over the replica's ``ModelSet``.

Ray's router sends a request whose ``serve_multiplexed_model_id`` header names a model (set in Ray's proxy:
``deploy/routing.py``) to a replica that reported holding it. A replica reports the model ids its
``@serve.multiplexed`` loader holds (``ray/serve/multiplex.py``: the loaded ids, and those loading, pushed to Serve's
controller every 0.1 s after a change); that loader keeps at most ``max_num_models_per_replica`` (here
``--models-per-replica``) and drops its least recently used id to take a new one. So, in each replica:

- ``ReplicaModels.load(name)`` is that loader: it makes the model resident in the replica's ``ModelSet`` (acquire and
  release: a load on the set's loader thread when it is not resident) and returns a token Ray keeps for it;
- ``TellRay``, an ASGI middleware, calls it for the model in a request's header (a configured name only), as a task
  beside the request: Ray's record of the replica's models and its LRU order follow the requests, and the request
  itself waits for its model exactly as in a server of its own (its deadline, its job events, its errors);
- at start-up the models the set loaded (the default, the preloaded) are reported, so the default's requests go
  to every replica at once;
- when Ray's LRU drops a model, Ray calls the token's ``__del__``: the replica unloads that model if it is idle
  (``ModelSet.unload``), since Ray now sends its requests elsewhere and its memory is what this replica's other
  models and requests share (one budget). A model in flight, or pinned, stays, and the set's own budget decides
  later, as for any other. The set's budget stays the memory guard in every case: Ray counts models, the set counts
  bytes (shared components once, requests in flight). Where the budget unloads a model Ray still lists, the next
  request for it here loads it again (correct, only slower): give ``--models-per-replica`` the number of models one
  replica's budget holds, and the two agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from deploy.routing import MODEL_HEADER

logger = logging.getLogger(__name__)

__all__ = ["ReplicaModels", "TellRay", "multiplex_models"]

_HEADER_FORMS = {MODEL_HEADER, MODEL_HEADER.replace(b"_", b"-")}


class _Token:
    """What Ray's multiplexing keeps for a model id on this replica. Its unload hook is an instance attribute named
    ``__del__``, not a method: Ray awaits ``model.__del__()`` when its LRU drops the id (an async one on the
    replica's loop), while the garbage collector calls only a class's ``__del__`` (an async one would leave a
    coroutine never awaited)."""

    def __init__(self, name: str) -> None:
        self.name = name


class ReplicaModels:
    """Ray's multiplexed loader over the app's ``ModelSet`` (``app.state.modelset``; see the module's docstring)."""

    def __init__(self, api: Any, per_replica: int) -> None:
        self.api = api
        self.tasks: set[asyncio.Task[Any]] = set()  # the reports in progress (a task needs a reference to live)

        async def load_model_for_ray(model_id: str) -> _Token:  # a name no str method has: Ray's self check
            return await self._load(model_id)

        # Made per replica, as Ray allows (serve.multiplexed on a function made at init): the limit is a setting.
        self.load = serve.multiplexed(max_num_models_per_replica=per_replica)(load_model_for_ray)

    @property
    def names(self) -> list[str]:
        models = getattr(self.api.state, "modelset", None)
        return models.names if models is not None else []

    async def _load(self, name: str) -> _Token:
        models = self.api.state.modelset
        models.release(await models.acquire(name))
        token = _Token(name)

        async def unload() -> None:
            if await models.unload(name):
                logger.info("model %s unloaded: Ray Serve routes its requests to other replicas", name)

        token.__del__ = unload  # type: ignore[method-assign] - see _Token
        return token

    def tell(self, name: str) -> None:
        """Report a request for ``name`` to Ray (a task beside the request; its failure is the request's to say)."""
        task = asyncio.ensure_future(self.load(name))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("model report to Ray failed: %s", task.exception())

    async def report_resident(self) -> None:
        """At start-up: report the models the set has loaded, the default last (the most recently used)."""
        models = self.api.state.modelset
        states = models.status()["models"]
        for name in sorted(models.names, key=lambda n: n == models.default):
            if states[name]["state"] == "resident":
                await self.load(name)


class TellRay:
    """Pure ASGI middleware: a request's model header, a configured name, is reported to Ray (``ReplicaModels``)."""

    def __init__(self, app: ASGIApp, models: ReplicaModels) -> None:
        self.app, self.models = app, models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            name = next((v for k, v in scope.get("headers", []) if k.lower() in _HEADER_FORMS), b"").decode()
            if name and name in self.models.names:
                self.models.tell(name)
        await self.app(scope, receive, send)


def multiplex_models(api: Any, per_replica: int) -> ReplicaModels:
    """Wire Ray's multiplexing into a replica's app of several models: ``TellRay`` on its requests, and the models
    loaded at start-up reported once the startup has loaded them (the lifespan this wraps: ``hold_until_loaded``'s).
    ``per_replica``: Ray's ``max_num_models_per_replica`` (0: every configured model)."""
    models = ReplicaModels(api, per_replica or len(api.state.settings.model_specs))
    api.add_middleware(TellRay, models=models)
    original = api.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with original(target) as state:
            try:
                await models.report_resident()
            except Exception:  # noqa: BLE001 - the replica serves every model anyway, without the locality
                logger.exception("reporting the loaded models to Ray Serve failed")
            yield state

    api.router.lifespan_context = lifespan
    return models
