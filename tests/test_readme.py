"""The README documents every option and the commands CI relies on."""

from __future__ import annotations

import re
from pathlib import Path

import serverasync
from serverasync import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CI = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()


def test_every_option_is_in_the_readme_table() -> None:
    documented = set(re.findall(r"^\| `(--[a-z-]+)` \|", README, flags=re.MULTILINE))
    flags = {"--" + name.replace("_", "-") for name in Settings.model_fields}
    assert flags - documented == set(), "options missing from the README's table"
    assert documented - flags == set(), "README documents options that do not exist"


CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def test_readme_commands_match_ci() -> None:
    # A CPU user gets the CPU build (a plain `pip install torch` pulls CUDA's), the same one CI installs.
    assert CPU_TORCH in README and CPU_TORCH in CI
    assert "pip install -r requirements.txt && python serverasync.py --model random:tiny" in README
    assert "python3 -m venv" in README and "pip install openai" in README
    assert "bash .ci/run" in README
    assert "python -m pytest -q" in README and "python -m pytest -q" in CI


def test_the_quick_starts_torch_install_is_cis() -> None:
    """The same flags as CI's (no retries, a short timeout), so a machine that can't reach PyTorch's index falls back
    to its configured wheels at once in both."""
    ci_line = next(line for line in CI.splitlines() if "pip install torch==" in line)
    command = ci_line.removeprefix("python -m ").replace(" -q", "")
    by_hand = next(block for block in _quick_start_blocks() if "python3 -m venv" in block)
    assert command in by_hand.splitlines(), (command, by_hand)


def _quick_start_blocks() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_the_quick_start_is_one_command_and_documents_its_options() -> None:
    """The first command is ./serve; its table lists every option and variable the script reads, and no other."""
    assert _quick_start_blocks()[0] == "./serve --model random:tiny\n"
    script = (Path(__file__).resolve().parent.parent / "serve").read_text()
    header = script.split("set -euo pipefail", 1)[0]
    options = set(re.findall(r"^#\s+(--[a-z-]+)", header, flags=re.M))
    assert options == {"--venv", "--torch", "--python", "--dry-run"}, options
    assert options <= set(re.findall(r"--[a-z-]+", script.split("while [", 1)[1].split("done", 1)[0]))
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(?:`(--[a-z-]+)[^`]*`[^|]*)?\|\s*(?:`(SERVE_[A-Z_]+)`)?\s*\|", section, flags=re.M)
    assert {flag for flag, _ in rows if flag} == options, rows
    assert {env for _, env in rows if env} == set(re.findall(r"\$\{(SERVE_[A-Z_]+):-", script)), rows


def test_the_client_examples_run_in_the_servers_virtual_environment() -> None:
    """test.py needs httpx from requirements.txt: the shell that runs it activates the environment first."""
    block = README.split("Then, from another shell", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0] == ". .venv/bin/activate" and lines[1].startswith("python test.py"), lines


def test_the_request_examples_are_sized_for_the_machine_they_run_on() -> None:
    """The examples take the model's native size ("auto", or no size), not an explicit 1024x1024 that takes a
    minute on a CPU even with random:tiny; larger explicit sizes in examples stay at most 256 pixels a side."""
    blocks = re.findall(r"```(?:bash|python)\n(.*?)```", README, flags=re.S)
    sizes = [s for block in blocks for s in re.findall(r"size\"?\s*[:=]\s*[\"'](\d+)x(\d+)", block)]
    sides = [int(w) for w, _ in sizes] + [int(h) for _, h in sizes]
    sides += [int(v) for block in blocks for v in re.findall(r'"(?:width|height)":\s*(\d+)', block)]
    assert all(side <= 256 for side in sides), sizes
    assert README.count('size="auto"') >= 2 and README.count('"size": "auto"') >= 2


def test_every_exit_code_is_documented() -> None:
    section = README.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)}
    used = {value for name, value in vars(serverasync).items() if name.startswith("EXIT_")}
    assert documented == used == {0, 1, 2, 3, 130}
