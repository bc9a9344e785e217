"""The README documents every option and the commands CI relies on."""

from __future__ import annotations

import re
from pathlib import Path

from serverasync import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CI = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()


def test_every_option_is_in_the_readme_table() -> None:
    documented = set(re.findall(r"^\| `(--[a-z-]+)` \|", README, flags=re.MULTILINE))
    flags = {"--" + name.replace("_", "-") for name in Settings.model_fields}
    assert flags - documented == set(), "options missing from the README's table"
    assert documented - flags == set(), "README documents options that do not exist"


def test_readme_commands_match_ci() -> None:
    assert "pip install torch==2.13.0 -r requirements.txt && python serverasync.py --model random:tiny" in README
    assert "bash .ci/run" in README
    assert "python -m pytest -q" in README and "python -m pytest -q" in CI
    assert "torch==2.13.0" in CI
