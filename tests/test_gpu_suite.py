"""bench/gpu.sh --smoke: the GPU suite's own path (every run, every arm, the tables, the append to the results file)
on this CPU with random:tiny. No timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pyproject.toml's markers: CI runs it; -m 'not slow' leaves it out

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu.sh"


def _gpu_sh(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env, check=False
    )


def test_smoke_runs_every_arm_at_both_sizes_and_appends_the_tables_under_a_dated_heading(tmp_path: Path) -> None:
    out, results = tmp_path / "tables.md", tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    done = _gpu_sh("--smoke", "--out", str(out), "--results", str(results))
    assert done.returncode == 0, done.stderr[-3000:]

    tables = out.read_text()
    runs = re.split(r"^## Run ", tables, flags=re.M)[1:]
    sizes = [re.match(r".*: random:tiny, (\d+x\d+), 2 steps$", run.splitlines()[0]) for run in runs]
    assert [m.group(1) if m else None for m in sizes] == ["64x64", "32x32"]
    large, small = runs
    for run, arms in ((large, ("serial", "ours", "step", "step-compile")), (small, ("ours", "step", "step-compile"))):
        for burst in ("burst N=1", "burst N=2"):
            section = run.split(f"### {burst}\n", 1)[1].split("\n### ", 1)[0]
            rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
            assert set(arms) <= set(rows), (burst, rows)
            assert all(row.rstrip().endswith("| 0 |") for arm, row in rows.items() if arm in arms)  # none failed
    assert "step-compile server: `python serverasync.py" in large and "--engine step --compile`" in large
    assert "step-compile/step images/s" in large and "step/ours images/s" in small

    appended = results.read_text()
    assert appended.startswith("# Benchmark results\n")
    heading = re.search(
        r"^## GPU suite (\d{4}-\d\d-\d\d \d\d:\d\d UTC) on (.+): random:tiny, 2 steps, float32$", appended, flags=re.M
    )
    assert heading is not None, appended[:500]
    assert heading.group(2).startswith("CPU (cpu), torch ")
    assert "`bash bench/gpu.sh --smoke`" in appended
    # The runs' own headings sit one level under the suite's.
    assert appended.count("\n### Run ") == 2 and "\n#### burst N=2\n" in appended


def test_bad_arguments_exit_2_and_help_describes_the_suite() -> None:
    done = _gpu_sh("--bogus")
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
    assert _gpu_sh("--help").stdout.startswith("The whole GPU suite of bench/RESULTS.md in one command")
