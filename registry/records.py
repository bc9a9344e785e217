"""The records a ``ModelSet`` keeps and hands out, and its errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .components import Part
from .specs import ModelSpec

__all__ = ["STATES", "ModelLoadFailed", "ModelTooLarge", "ModelsRefused", "Resident"]

STATES = ("unloaded", "loading", "resident", "cpu")


class ModelTooLarge(ValueError):
    """The model cannot fit in the budget even alone."""

    def __init__(self, name: str, needed: int, budget: int) -> None:
        super().__init__(
            f"model {name!r} needs about {needed / 1e9:.2f} GB for its weights, more than the memory budget of "
            f"{budget / 1e9:.2f} GB even alone"
        )
        self.name, self.needed, self.budget = name, needed, budget


class ModelsRefused(ValueError):
    """At start-up: models that can never fit, each a ``ModelTooLarge``."""

    def __init__(self, refused: Sequence[ModelTooLarge]) -> None:
        super().__init__("; ".join(str(r) for r in refused))
        self.refused = list(refused)


class ModelLoadFailed(RuntimeError):
    """The loader (or ``build``) raised ``error`` while loading ``name``."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(f"model {name!r} failed to load: {error}")
        self.name, self.error = name, error


class _Abandoned(Exception):
    """Every request waiting for a load gave up before room was found."""


@dataclass
class Resident:
    """What ``acquire`` hands a request: the model's spec, loaded pipeline and served bundle; give it back with
    ``ModelSet.release`` (once)."""

    spec: ModelSpec
    loaded: Any
    served: Any
    state: str = "resident"
    _released: bool = field(default=False, repr=False)


@dataclass
class _Job:
    future: asyncio.Future[Any]
    waiters: int = 0


@dataclass
class _Model:
    spec: ModelSpec
    state: str = "unloaded"
    loaded: Any = None
    served: Any = None
    parts: list[Part] = field(default_factory=list)  # measured while loaded (resident or cpu), else []
    estimate: list[Part] | None = None
    in_flight: int = 0
    loads: int = 0
    evictions: int = 0
    last_used: float = 0.0  # time.monotonic()
    job: _Job | None = None
