"""Per-request schedulers.

A diffusers scheduler is stateful: ``set_timesteps`` rewrites ``timesteps``/``sigmas`` and ``step`` advances
``_step_index``. Two requests sharing one scheduler corrupt each other (the classic
``IndexError: index 21 is out of bounds for dimension 0 with size 21``). The tools here give every request its
own scheduler while the shared one is never touched.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["BaseAsyncScheduler", "async_retrieve_timesteps", "clone_scheduler"]


def clone_scheduler(scheduler: Any) -> Any:
    """Return an independent copy of ``scheduler`` (its state included).

    ``deepcopy`` keeps any state the owner set on purpose (custom sigmas, begin index); a scheduler that cannot be
    deep-copied is rebuilt from its config, which gives the same schedule from a fresh state.
    """
    if isinstance(scheduler, BaseAsyncScheduler):
        scheduler = scheduler.scheduler
    try:
        return copy.deepcopy(scheduler)
    except Exception:  # noqa: BLE001 - any failure of deepcopy falls back to the config route
        logger.debug("deepcopy of %s failed; rebuilding it from its config", type(scheduler).__name__, exc_info=True)
        return scheduler.__class__.from_config(scheduler.config)


def _needs_mu(scheduler: Any, kwargs: dict[str, Any]) -> bool:
    config = getattr(scheduler, "config", None)
    dynamic = bool(config.get("use_dynamic_shifting", False)) if hasattr(config, "get") else False
    return dynamic and kwargs.get("mu") is None


class BaseAsyncScheduler:
    """A transparent proxy around a scheduler that can clone itself for one request.

    Attribute reads and writes reach the wrapped scheduler, so the proxy can stand wherever the scheduler did.
    """

    def __init__(self, scheduler: Any) -> None:
        if isinstance(scheduler, BaseAsyncScheduler):
            scheduler = scheduler.scheduler
        # Stored in __dict__ directly: __setattr__ below forwards everything else to the wrapped scheduler.
        object.__setattr__(self, "scheduler", scheduler)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, i.e. for everything but `scheduler` and the methods below.
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scheduler":
            object.__setattr__(self, name, value)
        else:
            setattr(self.scheduler, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.scheduler, name)

    def clone_for_request(
        self, num_inference_steps: int | None = None, device: str | torch.device | None = None, **kwargs: Any
    ) -> BaseAsyncScheduler:
        """Return a new wrapper around an independent scheduler, its timesteps set for this request.

        With ``num_inference_steps=None`` the clone's timesteps are left as they were. A scheduler with dynamic
        shifting needs ``mu`` (which depends on the image size); without it the clone is returned unset and the
        pipeline sets the timesteps itself, on the clone.
        """
        local = clone_scheduler(self.scheduler)
        if num_inference_steps is not None and not _needs_mu(local, kwargs):
            local.set_timesteps(num_inference_steps, device=device, **kwargs)
        return BaseAsyncScheduler(local)

    def __repr__(self) -> str:
        timesteps = getattr(self.scheduler, "timesteps", None)
        n = len(timesteps) if timesteps is not None else None
        return f"BaseAsyncScheduler({type(self.scheduler).__name__}, timesteps={n})"

    def __str__(self) -> str:
        return f"BaseAsyncScheduler wrapping {self.scheduler}"


def _accepts(scheduler: Any, name: str) -> bool:
    return name in inspect.signature(scheduler.set_timesteps).parameters


def async_retrieve_timesteps(
    scheduler: Any,
    num_inference_steps: int | None = None,
    device: str | torch.device | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, Any]:
    """Set and return a schedule, like diffusers' ``retrieve_timesteps``.

    By default it calls ``scheduler.set_timesteps`` and returns ``(timesteps, num_inference_steps)``, exactly as
    diffusers does. With ``return_scheduler=True`` the given scheduler is left untouched: the schedule is set on a
    clone, and ``(timesteps, num_inference_steps, scheduler_in_use)`` is returned.
    """
    return_scheduler = bool(kwargs.pop("return_scheduler", False))
    if timesteps is not None and sigmas is not None:
        raise ValueError("Pass either `timesteps` or `sigmas`, not both: they are two ways to give one schedule.")

    if return_scheduler:
        target = clone_scheduler(scheduler)
        if isinstance(scheduler, BaseAsyncScheduler):
            target = BaseAsyncScheduler(target)
    else:
        target = scheduler

    if timesteps is not None or sigmas is not None:
        name = "timesteps" if timesteps is not None else "sigmas"
        values = timesteps if timesteps is not None else sigmas
        if not _accepts(target, name):
            cls = type(target.scheduler if isinstance(target, BaseAsyncScheduler) else target).__name__
            raise ValueError(
                f"{cls}.set_timesteps does not accept custom `{name}`; use a scheduler that supports them "
                f"or pass `num_inference_steps` instead."
            )
        target.set_timesteps(**{name: values}, device=device, **kwargs)
        result = target.timesteps
        num_inference_steps = len(result)
    else:
        target.set_timesteps(num_inference_steps, device=device, **kwargs)
        result = target.timesteps

    if return_scheduler:
        return result, num_inference_steps, target
    return result, num_inference_steps
