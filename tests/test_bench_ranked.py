"""bench/ranked_bursts.py runs (tiny settings) and prints, per engine, the latency by finishing rank."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # pyproject.toml's markers: CI runs it; -m 'not slow' leaves it out


def test_ranked_bursts_smoke_run_prints_every_rank_for_both_engines(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    command = [sys.executable, str(REPO / "bench" / "ranked_bursts.py"), "--size", "32", "--steps", "2"]
    command += ["--burst", "3", "--rounds", "2", "--warmup-burst", "2", "--markdown", str(report)]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=280, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    number = r" \| ([\d.]+)"
    rows = re.findall(r"^\| (threads|step)" + number * 5 + r" \|$", done.stdout, re.M)
    assert [row[0] for row in rows] == ["threads", "step"], done.stdout
    for _, mean, *ranks, span in rows:
        by_rank = [float(r) for r in ranks]
        assert by_rank == sorted(by_rank) and min(by_rank) <= float(mean) <= max(by_rank) <= float(span) + 0.05
    assert re.search(r"mean latency step/threads: [\d.]+x", done.stdout)
    assert "python bench/ranked_bursts.py" in report.read_text()
    script = str(REPO / "bench" / "ranked_bursts.py")
    assert subprocess.run([sys.executable, script, "--burst", "0"], capture_output=True).returncode == 2
