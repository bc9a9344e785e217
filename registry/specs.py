"""Which models a server holds: ``ModelSpec`` (a name, a source, and whether it is the default, preloaded or pinned),
read from repeated ``--model`` values or from a models file (TOML). Light: no torch.

The ``--model`` rule: a value is ``NAME=SOURCE`` when the text before its first ``=`` is a valid name (letters,
digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 64 characters); anything else is a bare
``SOURCE`` whose name is the source string itself, as a server of one model answers today (``random:tiny``,
``stabilityai/stable-diffusion-3.5-medium``, ``/models/a=b``: a ``/`` or ``:`` before the first ``=`` is never a
name). A relative directory whose name would read as ``NAME=`` is written with ``./`` (``./x=y``). A bare source's
name is exempt from the name pattern for that reason; a name given explicitly must match it. Names are unique.
The first model is the default unless one is marked ``default`` (in a models file, or with ``apply_flags``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomllib

__all__ = ["NAME_PATTERN", "ModelSpec", "apply_flags", "parse_model_options", "read_models_file"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FILE_KEYS = {"name": str, "source": str, "default": bool, "preload": bool, "pin": bool}


@dataclass(frozen=True)
class ModelSpec:
    """One configured model: ``source`` is a ``save_pretrained`` directory, a hub id or a ``random:`` preset."""

    name: str
    source: str
    default: bool = False
    preload: bool = False
    pinned: bool = False


def _split(value: str) -> tuple[str, str]:
    """``NAME=SOURCE`` or a bare ``SOURCE`` (see the module's docstring) -> (name, source)."""
    text = value.strip()
    if not text:
        raise ValueError("--model needs a value: NAME=SOURCE or SOURCE")
    name, sep, source = text.partition("=")
    if sep and NAME_PATTERN.fullmatch(name):
        if not source.strip():
            raise ValueError(f"--model {value!r}: no source after {name}=")
        return name, source.strip()
    return text, text


def _finish(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Unique names, exactly one default (the first unless one is marked)."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"model name {spec.name!r} is given twice; each model needs a name of its own")
        seen.add(spec.name)
    marked = [spec.name for spec in specs if spec.default]
    if len(marked) > 1:
        raise ValueError(f"more than one default model ({', '.join(marked)}); mark one")
    if specs and not marked:
        specs = [replace(specs[0], default=True), *specs[1:]]
    return specs


def parse_model_options(values: Iterable[str]) -> list[ModelSpec]:
    """Repeated ``--model`` values -> specs; the first is the default. ValueError saying what to write instead."""
    return _finish([ModelSpec(*_split(value)) for value in values])


def apply_flags(
    specs: list[ModelSpec], default: str | None = None, preload: Iterable[str] = (), pin: Iterable[str] = ()
) -> list[ModelSpec]:
    """Mark ``default``, ``preload`` and ``pin`` (names of ``specs``) on them; ValueError naming an unknown one."""
    names = [spec.name for spec in specs]
    for flag, wanted in (("default", [default] if default else []), ("preload", preload), ("pin", pin)):
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"--{flag} {', '.join(unknown)}: no such model; the models are {', '.join(names)}")
    preload, pin = set(preload), set(pin)
    return _finish(
        [
            replace(
                spec,
                default=spec.name == default if default else spec.default,
                preload=spec.preload or spec.name in preload,
                pinned=spec.pinned or spec.name in pin,
            )
            for spec in specs
        ]
    )


def _table_lines(text: str) -> list[int]:
    """The line number of each ``[[model]]`` header, in order (tomllib reports no positions for valid tables)."""
    pattern = re.compile(r"^\s*\[\[\s*model\s*\]\]")
    return [number for number, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]


def _spec_of(table: Any, where: str) -> ModelSpec:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: a model is a [[model]] table")
    unknown = sorted(set(table) - set(_FILE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_FILE_KEYS)}")
    for key, kind in _FILE_KEYS.items():
        if key in table and not isinstance(table[key], kind):
            raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, not {table[key]!r}")
    source = table.get("source", "").strip()
    if not source:
        raise ValueError(f"{where}: field 'source' is missing (a directory, a hub id or a random: preset)")
    name = table.get("name", source)
    if "name" in table and not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{where}: field 'name' {name!r} is not a model name (letters, digits, '.', '_', '-'; at most 64)"
        )
    flags = {key: table.get(key, False) for key in ("default", "preload")}
    return ModelSpec(name=name, source=source, pinned=table.get("pin", False), **flags)


def read_models_file(path: str | Path) -> list[ModelSpec]:
    """The ``[[model]]`` tables of a TOML file (fields: name, source, default, preload, pin) -> specs. ValueError
    naming the file, the line and the field."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the models file {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    extra = sorted(set(data) - {"model"})
    if extra:
        raise ValueError(f"{path}: unknown key(s) {', '.join(extra)}; models are [[model]] tables")
    tables = data.get("model", [])
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: no [[model]] table; write one per model, with name and source")
    lines = _table_lines(text)
    specs = []
    for index, table in enumerate(tables):
        line = f":{lines[index]}" if index < len(lines) else ""
        specs.append(_spec_of(table, f"{path}{line}: model #{index + 1}"))
    try:
        return _finish(specs)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
