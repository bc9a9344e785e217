"""The README and the documentation site (docs/) say what the code and CI do: every option is in the generated
reference, the commands are CI's, every page is in the navigation, every route and exit code is documented.
What the pages show is run against a real server in tests/test_docs_run.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
import yaml

import serverasync
from serverasync import Settings

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = (REPO / "README.md").read_text()
CI = (REPO / ".ci" / "run").read_text()
OPTIONS_PAGE = DOCS / "operations" / "options.md"
CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def page(name: str) -> str:
    """The Markdown of ``docs/<name>``."""
    return (DOCS / name).read_text()


def pages() -> dict[str, str]:
    """Every page of the site (``docs/**/*.md`` but the generator's folder), by its path under docs/."""
    return {
        path.relative_to(DOCS).as_posix(): path.read_text()
        for path in sorted(DOCS.rglob("*.md"))
        if "_tools" not in path.relative_to(DOCS).parts
    }


def everything() -> dict[str, str]:
    """The README and every page: what a reader may copy a command from."""
    return {"README.md": README, **{f"docs/{name}": text for name, text in pages().items()}}


def code_blocks(markdown: str, language: str | None = None) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order; only ``language``'s when given."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", markdown, flags=re.M | re.S)
    return [(lang, body) for lang, body in blocks if language is None or lang == language]


def section(markdown: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of that level."""
    return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def options_generator() -> ModuleType:
    """``docs/_tools/options.py``, the options reference's generator (not a package: loaded by its path)."""
    spec = importlib.util.spec_from_file_location("docs_options", DOCS / "_tools" / "options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the options reference -----------------------------------------------------------------------------------------


def test_every_option_is_in_the_reference_exactly_once() -> None:
    rows = Counter(re.findall(r"^\| `(--[a-z0-9-]+)`<br>", OPTIONS_PAGE.read_text(), flags=re.M))
    flags = {"--" + name.replace("_", "-") for name in Settings.model_fields}
    assert set(rows) - flags == set(), "the reference documents options that do not exist"
    assert flags - set(rows) == set(), "options missing from the reference: run python docs/_tools/options.py"
    assert {flag for flag, count in rows.items() if count > 1} == set(), rows


def test_the_options_reference_is_what_the_generator_writes_now() -> None:
    current = OPTIONS_PAGE.read_text()
    assert options_generator().render(current) == current, (
        "docs/operations/options.md differs from the settings: run python docs/_tools/options.py"
    )


def test_a_new_option_makes_the_reference_out_of_date_until_it_is_regenerated() -> None:
    """A field added to Settings, with nothing else changed: the check fails, and regenerating puts the new flag
    into the "Other options" table (no edit of the generator needed)."""
    from pydantic import Field

    class Grown(Settings):
        no_clip_g: bool = Field(False, description="load the model without CLIP-G")

    generator = options_generator()
    current = OPTIONS_PAGE.read_text()
    with mock.patch.object(generator, "_settings", return_value=(Grown, "SERVER_")):
        regenerated = generator.render(current)
    assert regenerated != current
    other = section(regenerated, "Other options")
    assert "| `--no-clip-g`<br>`SERVER_NO_CLIP_G` | switch | off | load the model without CLIP-G |" in other


def _parser_actions() -> dict[str, argparse.Action]:
    """The argparse actions ``parse_settings`` builds, by field name."""
    seen: dict[str, argparse.Action] = {}
    add_argument = argparse.ArgumentParser.add_argument

    def record(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> argparse.Action:
        action = add_argument(self, *args, **kwargs)
        seen[action.dest] = action
        return action

    with mock.patch.object(argparse.ArgumentParser, "add_argument", record):
        serverasync.parse_settings([], environ={})
    seen.pop("help")
    return seen


def test_the_references_flags_and_value_kinds_are_the_parsers() -> None:
    """Each row's flag is the one the CLI parser takes, a "switch" takes no value, a "repeatable" one appends."""
    rows = {
        flag: kind
        for flag, kind in re.findall(r"^\| `(--[a-z0-9-]+)`<br>[^|]* \| (\w+) \|", OPTIONS_PAGE.read_text(), flags=re.M)
    }
    actions = _parser_actions()
    assert set(actions) == set(Settings.model_fields)
    for action in actions.values():
        [flag] = action.option_strings
        kind = rows[flag]
        assert (kind == "switch") == isinstance(action, argparse._StoreTrueAction), (flag, kind)
        assert (kind == "repeatable") == isinstance(action, argparse._AppendAction), (flag, kind)


def test_the_references_variables_are_the_ones_the_settings_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each documented variable reaches its option: a value set in it is either the option's value or refused by
    the option's own validation (a variable the settings did not read would change nothing)."""
    from pydantic import ValidationError

    rows = re.findall(r"^\| `--([a-z0-9-]+)`<br>([^|]*) \|", OPTIONS_PAGE.read_text(), flags=re.M)
    assert len(rows) == len(Settings.model_fields)
    for flag, variables in rows:
        name = flag.replace("-", "_")
        names = re.findall(r"`([A-Z0-9_]+)`", variables)
        assert names and names[0] == f"SERVER_{name.upper()}", (flag, names)
        for variable in names:
            monkeypatch.setenv(variable, "not a value of any kind")
            try:
                assert getattr(Settings(), name) != Settings.model_fields[name].get_default(call_default_factory=True)
            except ValidationError as exc:
                assert name in {str(error["loc"][0]) for error in exc.errors() if error["loc"]}, (variable, exc)
            monkeypatch.delenv(variable)
    model = re.search(r"^\| `--model`<br>([^|]*) \|", OPTIONS_PAGE.read_text(), flags=re.M)
    assert model is not None and model.group(1).strip() == "`SERVER_MODEL`, `MODEL_PATH`"


# -- the commands are CI's -----------------------------------------------------------------------------------------


def test_the_commands_match_ci() -> None:
    # A CPU user gets the CPU build (a plain `pip install torch` pulls CUDA's), the same one CI installs.
    install = page("getting-started/install.md")
    assert CPU_TORCH in install and CPU_TORCH in CI
    assert "pip install -r requirements.txt && python serverasync.py --model random:tiny" in install
    assert "python3 -m venv" in install and "pip install openai" in page("getting-started/first-requests.md")
    assert "bash .ci/run" in README and "bash .ci/run" in install
    assert "python -m pytest -q" in install and "python -m pytest -q" in CI
    assert "mkdocs build --strict" in README and "mkdocs build --strict" in CI
    assert "-r requirements-docs.txt" in CI


def test_the_docs_requirements_are_pinned() -> None:
    """A theme release can change what strict mode warns about: exact versions, and mkdocs-material among them."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements-docs.txt").read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert requirements and all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", line) for line in requirements), requirements
    assert {line.split("==")[0] for line in requirements} >= {"mkdocs", "mkdocs-material"}


def test_the_quick_starts_torch_install_is_cis() -> None:
    """The same flags as CI's (no retries, a short timeout), so a machine that can't reach PyTorch's index falls back
    to its configured wheels at once in both."""
    ci_line = next(line for line in CI.splitlines() if "pip install torch==" in line)
    command = ci_line.removeprefix("python -m ").replace(" -q", "")
    blocks = code_blocks(page("getting-started/install.md"), "bash")
    by_hand = next(body for _, body in blocks if "python3 -m venv" in body)
    assert command in by_hand.splitlines(), (command, by_hand)


def test_the_quick_start_is_one_command_and_documents_its_options() -> None:
    """The README's and the install page's first command is ./serve; the page's table lists every option and
    variable the script reads, and no other."""
    assert code_blocks(section(README, "Quick start"), "bash")[0][1] == "./serve --model random:tiny\n"
    install = page("getting-started/install.md")
    assert code_blocks(install, "bash")[0][1] == "./serve --model random:tiny\n"
    script = (REPO / "serve").read_text()
    header = script.split("set -euo pipefail", 1)[0]
    options = set(re.findall(r"^#\s+(--[a-z-]+)", header, flags=re.M))
    assert options == {"--venv", "--torch", "--python", "--dry-run"}, options
    assert options <= set(re.findall(r"--[a-z-]+", script.split("while [", 1)[1].split("done", 1)[0]))
    rows = re.findall(r"^\|\s*(?:`(--[a-z-]+)[^`]*`[^|]*)?\|\s*(?:`(SERVE_[A-Z_]+)`)?\s*\|", install, flags=re.M)
    assert {flag for flag, _ in rows if flag} == options, rows
    assert {env for _, env in rows if env} == set(re.findall(r"\$\{(SERVE_[A-Z_]+):-", script)), rows


def test_the_client_examples_run_in_the_servers_virtual_environment() -> None:
    """test.py needs httpx from requirements.txt: every shell block that runs it activates the environment first."""
    blocks = [(where, body) for where, text in everything().items() for _, body in code_blocks(text, "bash")]
    runs = [(where, body) for where, body in blocks if "python test.py" in body]
    assert len(runs) >= 4, runs
    for where, body in runs:
        lines = [line for line in body.splitlines() if line.strip()]
        assert lines[0] == ". .venv/bin/activate" and lines[1].startswith("python test.py"), (where, lines)


def _script_options(script: str) -> dict[str, Any]:
    """A script's options as its own parser (made and run by its ``parse_args``) declares them: {flag: default},
    ``--help`` left out. The script is loaded from its file (``test.py`` would be the standard library's
    ``test`` package by name)."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", REPO / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {spec.name: module}):  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    parsers: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> argparse.Namespace:
        parsers.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        module.parse_args([])
    [parser] = parsers
    return {
        flag: action.default
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


@pytest.mark.parametrize(
    ("script", "where"), [("test.py", "getting-started/first-requests.md"), ("make_lora.py", "features/lora.md")]
)
def test_every_option_of_the_scripts_for_people_is_in_its_pages_table(script: str, where: str) -> None:
    """Each option of ``test.py`` (``--url`` among them: a server on another port or machine) and of ``make_lora.py``
    has a row in its page's table, with its default where it has a plain one, so no one has to read ``--help``."""
    rows = [line for line in page(where).splitlines() if line.startswith("| `--")]
    options = _script_options(script)
    assert "--url" in options or script != "test.py"
    for flag, default in options.items():
        [row] = [row for row in rows if re.search(rf"`{flag}[ `]", row.split("|")[1])]
        default_cell = row.split("|")[2]
        if isinstance(default, (str, int, float)) and not isinstance(default, bool):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert shown in default_cell, (flag, row)


def test_the_request_examples_are_sized_for_the_machine_they_run_on() -> None:
    """The examples take the model's native size ("auto", or no size), not an explicit 1024x1024 that takes a
    minute on a CPU even with random:tiny; larger explicit sizes in examples stay at most 256 pixels a side."""
    blocks = [body for text in everything().values() for lang, body in code_blocks(text) if lang in ("bash", "python")]
    sizes = [s for block in blocks for s in re.findall(r"size\"?\s*[:=]\s*[\"'](\d+)x(\d+)", block)]
    sides = [int(w) for w, _ in sizes] + [int(h) for _, h in sizes]
    sides += [int(v) for block in blocks for v in re.findall(r'"(?:width|height)":\s*(\d+)', block)]
    sides += [int(v) for block in blocks for v in re.findall(r"--(?:width|height) (\d+)", block)]
    assert all(side <= 256 for side in sides), sizes
    joined = "\n".join(blocks)
    assert joined.count('size="auto"') >= 2 and joined.count('"size": "auto"') >= 2


def test_every_exit_code_is_documented() -> None:
    table = section(page("operations/exit-codes.md"), "Exit codes")
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)}
    used = {value for name, value in vars(serverasync).items() if name.startswith("EXIT_")}
    assert documented == used == {0, 1, 2, 3, 130}


def test_the_presets_memory_figures_are_on_the_models_page() -> None:
    """The figures tests/test_cli.py computes from Pipelines.required_bytes."""
    models = page("operations/models.md")
    assert all(figure in models for figure in ("31.6 GB", "25.3 GB", "1.4 MB", "0.9 MB"))


# -- the site holds together ---------------------------------------------------------------------------------------


def _nav_files(entries: Any) -> list[str]:
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [file for entry in entries for file in _nav_files(entry)]
    if isinstance(entries, dict):
        return [file for value in entries.values() for file in _nav_files(value)]
    return []


def test_every_page_is_in_the_navigation_once_and_every_entry_is_a_page() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    assert sorted(nav) == sorted(set(nav)), Counter(nav)
    assert set(nav) == set(pages()), (set(pages()) - set(nav), set(nav) - set(pages()))
    assert config["strict"] is True and config["theme"]["font"] is False
    assert "_tools/" in config["exclude_docs"]


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    without_code = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return {slug(heading) for heading in re.findall(r"^#{1,6} (.+)$", without_code, flags=re.M)}


def test_the_readmes_links_into_the_site_lead_to_pages_and_headings() -> None:
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", README)
    assert len({target for target, _ in links}) >= 25, links  # every page, from the README's table
    for target, anchor in links:
        path = REPO / target
        assert path.is_file(), target
        if anchor:
            assert anchor in anchors(path.read_text()), (target, anchor)
    assert {f"docs/{name}" for name in pages()} <= {target for target, _ in links}


def test_every_code_block_is_closed() -> None:
    """An unclosed fence swallows the rest of its page into one code block, and strict mode does not see it."""
    for where, text in everything().items():
        fences = re.findall(r"^```", text, flags=re.M)
        assert len(fences) % 2 == 0, where


def test_every_metric_is_on_the_metrics_page() -> None:
    names = set(re.findall(r'"(sd_[a-z_]+)"', (REPO / "api" / "metrics.py").read_text()))
    assert len(names) >= 10, names
    assert {name for name in names if name not in page("operations/metrics.md")} == set()


def test_the_json_examples_are_json() -> None:
    for where, text in everything().items():
        for _, body in code_blocks(text, "json"):
            json.loads(body)  # raises, naming nothing: the message has the body
            assert body, where


def test_the_included_benchmark_files_lose_no_section() -> None:
    """The benchmark pages include bench/README.md and bench/RESULTS.md from a line on (their title and intro are
    the page's own, rewritten where they link outside the site): what is left out is the title and its intro, never
    a section."""
    text = page("design/benchmarks.md") + page("design/benchmark-results.md")
    includes = re.findall(r'^--8<-- "([^":]+):(\d+)"$', text, flags=re.M)
    assert {file for file, _ in includes} == {"bench/README.md", "bench/RESULTS.md"}
    for file, start in includes:
        lines = (REPO / file).read_text().splitlines()
        skipped, kept = lines[: int(start) - 1], lines[int(start) - 1 :]
        assert skipped[0].startswith("# ") and not any(line.startswith("#") for line in skipped[1:]), (file, skipped)
        assert kept and not kept[0].startswith("# "), (file, kept[:1])


def _routes(routes: list[Any], prefix: str = "") -> list[tuple[str, set[str]]]:
    """(path, methods) of every route, through included routers (flattened or not, by FastAPI's version)."""
    from starlette.routing import Route

    found: list[tuple[str, set[str]]] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found += _routes(inner.routes, prefix + getattr(getattr(route, "include_context", None), "prefix", ""))
        elif isinstance(route, Route):
            found.append((prefix + route.path, set(route.methods or ())))
    return found


def test_every_route_is_in_the_endpoints_table() -> None:
    """A route added to the app without a row here fails (its path parameters may be named differently)."""
    table = page("api/endpoints.md")
    documented = {
        (method, re.sub(r"\{[^}]*\}", "{}", path))
        for cell in re.findall(r"^\| (`[A-Z]+ /[^|]*)\|", table, flags=re.M)
        for method, path in re.findall(r"`([A-Z]+) (/[^`\s]*)`", cell)
    }
    app = serverasync.create_app(Settings(model="random:tiny"), loader=lambda settings: None)
    routes = {
        (method, re.sub(r"\{[^}]*\}", "{}", path))
        for path, methods in _routes(app.routes)
        if not path.startswith(("/docs/", "/ui/static/"))
        for method in methods - {"HEAD"}
    }
    assert len(routes) >= 18, routes
    assert routes - documented == set(), "routes missing from docs/api/endpoints.md"
    assert documented - routes == set(), "docs/api/endpoints.md lists routes the app does not have"
