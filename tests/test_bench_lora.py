"""bench/lora_mix.py runs (tiny settings) and prints its table: every engine, every burst, ratios against none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # pyproject.toml's markers: CI runs it; -m 'not slow' leaves it out


def test_lora_mix_smoke_run_prints_every_engine_and_burst(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    command = [sys.executable, str(REPO / "bench" / "lora_mix.py"), "--burst", "2", "--steps", "2", "--size", "32"]
    command += ["--markdown", str(report)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = re.findall(r"^\| (threads|step) \| (none|one|mixed) \| [\d.]+ \| ([\d.]+)x \| [\d.]+ \|$", done.stdout, re.M)
    assert [(engine, burst) for engine, burst, _ in rows] == [
        (engine, burst) for engine in ("threads", "step") for burst in ("none", "one", "mixed")
    ]
    assert [ratio for _, burst, ratio in rows if burst == "none"] == ["1.00", "1.00"]
    assert "python bench/lora_mix.py" in report.read_text()
