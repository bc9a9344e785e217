"""The options reference, ``docs/operations/options.md``, generated from the server's settings.

    python docs/_tools/options.py           # rewrite the page's tables from api/settings.py
    python docs/_tools/options.py --check   # exit 1 (and say so) when the page is out of date

The page is prose written by hand around generated tables. Each table sits between a marker that names the settings
fields it lists and an end marker::

    <!-- options: host port public_url -->
    ...generated...
    <!-- /options -->

One table is marked ``<!-- options: * -->``: it lists every field that no other table names, so an option added to
``Settings`` lands there (and in ``--help``) without anyone editing this file; move it to its section by adding its
name to a marker. Every field appears in exactly one table. Each row comes from the field itself: the flag as
``parse_settings`` builds it, the environment variables pydantic-settings reads, the default (the description's own
"(default: ...)" when it has one, as ``--help`` shows it), and the description. ``tests/test_docs.py`` fails when the
page differs from what this script writes.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "operations" / "options.md"
COMMAND = "python docs/_tools/options.py"

_MARKER = re.compile(r"(<!-- options: (?P<names>[^>]*?) -->\n)(?P<body>.*?)(<!-- /options -->)", re.S)
_DEFAULT = re.compile(r"\s*\(default: (?P<text>(?:[^()]|\([^()]*\))*)\)")
_HEADER = "| option | value | default | meaning |\n|---|---|---|---|\n"
# The tables sit in a div the site's style sheet knows (docs/stylesheets/extra.css: flags and variables unbroken).
_OPEN, _CLOSE = '<div class="options-table" markdown>\n\n', "\n</div>\n"


def _settings() -> Any:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from api.settings import ENV_PREFIX, Settings

    return Settings, ENV_PREFIX


def _kind(annotation: Any) -> str:
    """What the flag takes, in a word; ``X | None`` is X (None is "not set")."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return "switch"
    if typing.get_origin(annotation) is list:
        return "repeatable"
    return {int: "integer", float: "number", str: "text"}.get(annotation, "text")


def _format_default(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "none"
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _cell(text: str) -> str:
    """Text fit for a table cell: flags and variables as code; Markdown's table and emphasis marks escaped."""
    text = text.replace("|", "\\|").replace("*", "\\*")
    return re.sub(r"(?<![\w`-])(--[a-z][a-z0-9-]*|[A-Z][A-Z0-9]*_[A-Z0-9_]+)", r"`\1`", text)


def row(name: str) -> str:
    """One table row: the flag over its environment variable(s), the value it takes, its default, its meaning."""
    settings, prefix = _settings()
    field = settings.model_fields[name]
    flag = "--" + name.replace("_", "-")
    aliases = getattr(field.validation_alias, "choices", None) or [prefix + name]
    # The bare field name among a field's aliases is how code passes it (Settings(model=...)), not a variable to set.
    variables = [str(alias).upper() for alias in aliases if alias != name]
    description = str(field.description or "")
    found = _DEFAULT.search(description)
    if found:
        default = found.group("text")
        description = (description[: found.start()] + description[found.end() :]).strip()
    else:
        default = _format_default(field.get_default(call_default_factory=True))
    kind = _kind(field.annotation)
    option = f"`{flag}`<br>" + ", ".join(f"`{v}`" for v in variables)
    return f"| {option} | {kind} | {_cell(default)} | {_cell(description)} |"


def render(page: str) -> str:
    """``page`` with every marked table regenerated; raises ``ValueError`` for a marker naming an unknown field, a
    field named twice, or a page without exactly one ``*`` table."""
    settings, _ = _settings()
    fields = list(settings.model_fields)
    markers = [m.group("names").split() for m in _MARKER.finditer(page)]
    named = [name for names in markers for name in names if name != "*"]
    unknown = sorted(set(named) - set(fields))
    twice = sorted({name for name in named if named.count(name) > 1})
    if unknown or twice:
        raise ValueError(f"options page markers: unknown fields {unknown}, fields named twice {twice}")
    if sum(names == ["*"] for names in markers) != 1:
        raise ValueError("the options page needs exactly one <!-- options: * --> table (the options not placed yet)")
    rest = [name for name in fields if name not in named]

    def table(match: re.Match[str]) -> str:
        names = match.group("names").split()
        chosen = rest if names == ["*"] else names
        if chosen:
            body = _OPEN + _HEADER + "".join(row(name) + "\n" for name in chosen) + _CLOSE
        else:
            body = "Every option is in one of the sections above.\n"
        return match.group(1) + body + match.group(4)

    return _MARKER.sub(table, page)


def main(argv: list[str]) -> int:
    current = PAGE.read_text()
    wanted = render(current)
    if "--check" in argv:
        if wanted != current:
            print(f"{PAGE.relative_to(REPO)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        PAGE.write_text(wanted)
        print(f"rewrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
