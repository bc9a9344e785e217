"""What ``ModelSet.status()`` says: per model, its state and bytes (alone and shared), its counters; the shared
components (a short hash of their identity, their class, bytes, which models use them); the budget and its use."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .components import Entry
from .records import _Model
from .residency import device_bytes

__all__ = ["describe"]


def describe(models_set: Any, models: Sequence[_Model], entries: Sequence[Entry]) -> dict[str, Any]:
    """(Under the set's lock.) The status dict (see the module's docstring)."""
    users: dict[str, list[str]] = defaultdict(list)
    for model in models:
        for part in model.parts:
            if part.key:
                users[part.key].append(model.spec.name)
    now_wall, now = time.time(), time.monotonic()
    per_model = {}
    for model in models:
        alone = sum(p.nbytes for p in model.parts if len(users.get(p.key or "", [])) <= 1)
        shared = sum(p.nbytes for p in model.parts if len(users.get(p.key or "", [])) > 1)
        estimate = device_bytes({model.spec.name: model.estimate}) if model.estimate is not None else None
        per_model[model.spec.name] = {
            "state": model.state,
            "source": model.spec.source,
            "default": model.spec.default,
            "pinned": model.spec.pinned,
            "bytes_alone": alone,
            "bytes_shared": shared,
            "bytes_estimated": estimate,
            "in_flight": model.in_flight,
            "loads": model.loads,
            "evictions": model.evictions,
            "last_used": now_wall - (now - model.last_used) if model.last_used else None,
        }
    by_key = {entry.key: entry for entry in entries}
    shared_components = [
        {
            "id": key[:12],
            "class": by_key[key].identity.cls if key in by_key else None,
            "bytes": by_key[key].nbytes if key in by_key else None,
            "models": sorted(names),
        }
        for key, names in sorted(users.items())
        if len(names) > 1
    ]
    resident = {m.spec.name: m.parts for m in models if m.state == "resident"}
    on_device = set().union(*({p.key for p in parts} for parts in resident.values())) if resident else set()
    tier = {m.spec.name: m.parts for m in models if m.state == "cpu"}
    return {
        "models": per_model,
        "shared_components": shared_components,
        "budget": models_set.budget,
        "used": device_bytes(resident),
        "cpu_budget": models_set.cpu_budget,
        "cpu_used": device_bytes(tier, exclude=on_device) if models_set.tiered else 0,
    }
