"""The server's models as the routes see them (issue 30): which one a request's ``model`` names, and what the routes
need of it (its sizes, its default guidance, its LoRA pool, its memory costs, its loaded pipeline).

A route calls ``use_model(request, requested)`` once, before it builds its generation: the name is resolved
(``ServerModels.resolve``: a configured model, an adapter's base model, else the default, or 404 ``model_not_found``
with ``--strict-model-names``) and the model's ``ModelView`` is kept on the request, where ``model_of(request)``
finds it (the default model's when the route named none). A model never loaded yet is loaded first: its sizes are
known only then. A view outlives an unload (its facts do not change); a request holds the model itself only while
the engine runs it (``engine.served``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from api.errors import APIError

__all__ = ["ModelView", "ServerModels", "model_error", "model_of", "server_models", "use_model"]


@dataclass
class ModelView:
    """What the routes need of one model, once it has loaded."""

    name: str
    geometry: Any  # api.loading.ModelGeometry
    default_guidance: float | None
    loaded: Any  # .pipeline, .device
    adapters: Any = None  # engine.adapters.AdapterPool
    memory: Any = None  # engine.memory_admission.MemoryAdmission

    def adapter_names(self) -> list[str]:
        return self.adapters.names() if self.adapters is not None else []


class ServerModels:
    """The configured models' names, the default, and the view of each model that has loaded (see the module).
    ``configured(name)``: the adapters configured for a model (--lora, --lora-dir), before it loads."""

    def __init__(
        self,
        names: list[str],
        default: str,
        strict: bool = False,
        configured: Callable[[str], list[str]] | None = None,
        several: bool = False,
    ) -> None:
        self.names = names
        self.default = default
        self.several = several  # a server of several models (a registry), not of one
        self.strict = strict
        self.views: dict[str, ModelView] = {}
        # Loads a model never seen (several models: ``attach``); None: the one model is known once loaded.
        self._view_of: Callable[[str], Awaitable[ModelView]] | None = None
        self._configured = configured  # a model's adapters as configured, for a model not loaded yet

    def adapters_of(self, name: str) -> list[str]:
        """The LoRA adapters of model ``name``: its pool's, or (never loaded yet) the ones configured for it."""
        view = self.views.get(name)
        if view is not None:
            return view.adapter_names()
        return self._configured(name) if self._configured is not None else []

    def owner_of(self, adapter: str) -> str | None:
        """The model whose LoRA pool has ``adapter`` (the default's first), among the models seen so far."""
        for name in (self.default, *self.names):
            if adapter in self.adapters_of(name):
                return name
        return None

    def resolve(self, requested: str | None) -> str:
        """The model a request's ``model`` names: a configured model, or the base model of an adapter it names;
        any other name goes to the default model, or is answered 404 ``model_not_found`` when strict."""
        if not requested or requested in self.names:
            return requested or self.default
        owner = self.owner_of(requested)
        if owner is not None:
            return owner
        if self.strict:
            raise APIError(
                404,
                f"The model {requested!r} does not exist on this server; the models are {', '.join(self.names)} "
                "(GET /v1/models lists them and their adapters).",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return self.default

    def attach(self, models: Any) -> None:
        """Several models: views of models not seen yet come from loading them in ``models`` (a ModelSet)."""

        async def view_of(name: str) -> ModelView:
            resident = await models.acquire(name)
            try:
                return resident.served.view
            finally:
                models.release(resident)

        self._view_of = view_of

    async def view(self, name: str) -> ModelView:
        """``name``'s view, loading the model first if it never has been."""
        view = self.views.get(name)
        if view is None and self._view_of is not None:
            view = self.views[name] = await self._loaded_view(name)
        if view is None:
            raise APIError(503, "The model is not ready (loading).", "unavailable", code="loading")
        return view

    async def _loaded_view(self, name: str) -> ModelView:
        from registry.models import ModelLoadFailed, ModelTooLarge

        assert self._view_of is not None
        try:
            return await self._view_of(name)
        except ModelTooLarge as exc:
            raise model_error(name, "too_large", str(exc)) from None
        except ModelLoadFailed:
            raise model_error(name, "load_failed", f"model {name!r} failed to load") from None


def model_error(name: str, reason: str, message: str) -> APIError:
    """The envelope of a model that cannot be made resident (``engine.ModelUnavailable``'s reasons)."""
    if reason == "too_large":
        return APIError(400, f"{message}.", "invalid_request_error", param="model", code="model_too_large")
    return APIError(
        503, f"{message}; see the server's log.", "unavailable", code="model_load_failed", headers={"Retry-After": "5"}
    )


async def use_model(request: Request, requested: str | None) -> ModelView:
    """Resolve the request's ``model`` and keep its view on the request for ``model_of`` (see the module)."""
    models: ServerModels = request.app.state.models
    view = await models.view(models.resolve(requested))
    request.state.model_view = view
    return view


def model_of(request: Request) -> ModelView:
    """The model the request was routed to (``use_model``), else the default model."""
    view = getattr(request.state, "model_view", None)
    if view is not None:
        return view
    models: ServerModels = request.app.state.models
    found = models.views.get(models.default)
    if found is None:
        raise APIError(503, "The model is not ready (loading).", "unavailable", code="loading")
    return found


def server_models(settings: Any) -> ServerModels:
    """The models the settings configure: several (names as given), or one (named as clients see it)."""
    from api.adapters import parse_lora_options

    def configured(name: str) -> list[str]:
        names = list(parse_lora_options(settings.loras_by_model().get(name, [])))
        directory = settings.lora_dirs().get(name)
        if directory is not None:
            names += sorted(p.stem for p in directory.glob("*.safetensors") if p.stem not in names)
        return names

    if settings.several_models:
        specs = settings.model_specs
        default = next(spec.name for spec in specs if spec.default)
        return ServerModels([spec.name for spec in specs], default, settings.strict_model_names, configured, True)
    name = settings.model_name
    return ServerModels([name], name, settings.strict_model_names)
