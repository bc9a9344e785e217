"""bench/several_models.py runs end to end (one repeat) and prints both tables: the memory of models loaded
separately against shared, and the switch times; and the memory claim holds, measured (the process's RSS, psutil,
each case in a fresh process) on random:encoder-heavy's family, whose encoders outweigh its transformer as SD3.5's
do: two models sharing their encoders and VAE take well under twice one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_bench_prints_memory_and_switch_times(tmp_path: Path) -> None:
    out = tmp_path / "tables.md"
    argv = ["--preset", "random:encoder-heavy", "--family", str(tmp_path / "family"), "--groups", "large,medium"]
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "several_models.py"),
            *argv,
            "--repeats",
            "1",
            "--json",
            "--markdown",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "| models | loaded separately (MiB) | one ModelSet, shared (MiB) | shared / separate |" in table
    assert "| large,medium | " in table
    assert "| from disk | " in table and "| from disk, encoders resident | " in table
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["switch from disk"] > 0 and figures["switch from disk, encoders resident"] > 0
    pair = figures["groups"]["large,medium"]
    one, shared, separate = figures["one"], pair["shared"], pair["separate"]
    assert separate > 1.7 * one, figures  # the measurement sees a second copy
    assert shared < 1.45 * one, figures  # random:encoder-heavy: the transformer is under a quarter of a model
