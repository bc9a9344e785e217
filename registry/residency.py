"""The arithmetic of residency, apart from any thread or model: what a set of models holds on the device (each
shared component counted once), which idle models to evict so that another fits, and what stays in the CPU tier.
Pure functions over ``Part`` lists, so that the rules can be read (and tested) in one place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .components import Part

__all__ = ["choose_victims", "cpu_overflow", "device_bytes", "device_keys"]


def _key(part: Part, owner: str) -> str:
    # A part whose content is unknown (a preset before it is built) is its owner's alone.
    return part.key or f"unknown:{owner}/{part.component}"


def device_keys(models: Mapping[str, Sequence[Part]]) -> set[str]:
    """The keys of the components ``models`` hold on the device."""
    return {_key(p, name) for name, parts in models.items() for p in parts if p.on_device}


def device_bytes(models: Mapping[str, Sequence[Part]], exclude: Iterable[str] = ()) -> int:
    """What ``models`` hold on the device together: each component once, however many models share it; the keys in
    ``exclude`` (held elsewhere) not counted."""
    seen: dict[str, int] = {}
    for name, parts in models.items():
        for part in parts:
            if part.on_device:
                seen[_key(part, name)] = part.nbytes
    excluded = set(exclude)
    return sum(n for key, n in seen.items() if key not in excluded)


def choose_victims(
    target: tuple[str, Sequence[Part]],
    resident: Mapping[str, Sequence[Part]],
    candidates: Sequence[str],
    budget: int,
) -> list[str] | None:
    """The models of ``candidates`` (least recently used first; idle and unpinned) to evict so that ``target`` fits
    in ``budget`` beside the rest of ``resident``; [] when it fits already, None when it cannot fit now (the rest
    are in flight or pinned). A candidate whose eviction frees nothing (all it holds is shared with the target or
    with a model that stays) is skipped."""
    keep = dict(resident)
    keep[target[0]] = target[1]
    victims: list[str] = []
    for name in candidates:
        if device_bytes(keep) <= budget:
            return victims
        without = {k: v for k, v in keep.items() if k != name}
        if device_bytes(without) < device_bytes(keep):
            keep = without
            victims.append(name)
    return victims if device_bytes(keep) <= budget else None


def cpu_overflow(
    tier: Mapping[str, Sequence[Part]], on_device: set[str], order: Sequence[str], cpu_budget: int
) -> list[str]:
    """The models of the CPU ``tier`` to drop, taken in ``order`` (least recently used first; only those that may
    go), so that what the tier holds apart from the device's keys fits ``cpu_budget``."""
    tier = dict(tier)
    dropped: list[str] = []
    for name in order:
        if device_bytes(tier, exclude=on_device) <= cpu_budget:
            break
        tier.pop(name, None)
        dropped.append(name)
    return dropped
