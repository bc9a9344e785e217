"""bench/mixed_tasks.py, run tiny: every task on both engines in one run, one table per burst (its shape, never
its timings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pyproject.toml's markers: CI runs it; -m 'not slow' leaves it out

REPO = Path(__file__).resolve().parent.parent


def test_mixed_tasks_smoke_run_prints_both_engines_side_by_side(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    command = [sys.executable, str(REPO / "bench" / "mixed_tasks.py"), "--size", "32", "--steps", "2"]
    command += ["--bursts", "3,4", "--markdown", str(report)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    assert done.stdout.strip() in text  # what it printed is what it appended
    header = "| engine | images/s | mean s | p95 s | first step mean s | t2i mean s | i2i mean s | inpaint mean s |"
    for burst in (3, 4):
        table = text.split(f"Burst of {burst}:", 1)[1].split("step/threads:", 1)
        lines = [line for line in table[0].splitlines() if line.startswith("|")]
        assert lines[0] == header + " failed |"
        rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
        assert list(rows) == ["threads", "step"]
        for cells in rows.values():
            assert len(cells) == 8 and cells[-1] == "0"  # nothing failed
            assert all(float(c) > 0 for c in cells[:-1])  # every task ran: no "-" column
        assert table[1].lstrip().startswith("images/s **")
    assert "transformer passes" in text and "mixed_tasks.py --size 32 --steps 2" in text


def test_mixed_tasks_refuses_an_unknown_engine() -> None:
    command = [sys.executable, str(REPO / "bench" / "mixed_tasks.py"), "--engines", "threads,warp"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown warp" in done.stderr
