"""bench/several_models.py runs end to end (on random:tiny's family, one repeat) and prints both tables: the memory of
models loaded separately against shared, and the switch times. The memory claim itself is measured in
tests/test_registry.py on random:encoder-heavy."""

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
    argv = ["--preset", "random:tiny", "--family", str(tmp_path / "family"), "--groups", "large,medium"]
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
