"""The house rules of ../shared/DESIGN.md, checked on the source: arrows run downward only, and rooms stay small.

Layers, top to bottom: ``serverasync.py`` and ``deploy/`` -> ``api/`` -> ``jobs/`` -> ``engine/`` -> ``utils/``;
``Pipelines.py`` (loading) sits below ``api/`` and uses ``models/`` (dtype names, random presets), which uses
nothing of ours; ``registry/`` (several models, their shared components and budget) sits below ``api/`` and uses
``Pipelines.py`` and ``models/``; ``make_lora.py``, a command beside the server's, loads models through
``Pipelines.py`` only.
Function-local imports count: a lazy import upward is still an arrow upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "jobs", "engine", "utils", "models", "registry", "deploy", "bench")
TOP_MODULES = ("serverasync.py", "Pipelines.py", "test.py", "make_lora.py")
OURS = {"api", "jobs", "engine", "utils", "models", "registry", "deploy", "Pipelines", "serverasync"}
# What each layer may import of ours (anything else of ours is an arrow upward or sideways).
MAY_IMPORT = {
    "jobs": {"jobs", "engine", "utils"},
    "engine": {"engine", "utils"},
    "utils": {"utils"},
    "models": {"models"},
    "Pipelines": {"models"},
    # Several models (their specs, shared components, budget): loads through Pipelines' helpers, below api.
    "registry": {"registry", "models", "Pipelines"},
    "make_lora": {"Pipelines", "models"},  # a command for people that loads a model as the server does, no server
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    files = [REPO / name for name in TOP_MODULES]
    for package in PACKAGES:
        files += sorted((REPO / package).rglob("*.py"))
    return [f for f in files if f.is_file()]


def _layer(path: Path) -> str:
    relative = path.relative_to(REPO)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported(tree: ast.AST) -> set[str]:
    """The top-level names of every absolute import in the module, function-local ones included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_sources_are_found() -> None:
    layers = {_layer(f) for f in _sources()}
    assert {"api", "jobs", "engine", "utils", "models", "Pipelines", "serverasync"} <= layers


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_imports_run_downward_only(layer: str) -> None:
    wrong = []
    for path in _sources():
        if _layer(path) != layer:
            continue
        ours = _imported(ast.parse(path.read_text())) & OURS
        for name in sorted(ours - MAY_IMPORT[layer]):
            wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_modules_and_functions_stay_small() -> None:
    big = []
    for path in _sources():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}(): {length} lines")
    assert not big, "rooms past the guideline (see ../shared/DESIGN.md):\n" + "\n".join(big)
