"""bench/small_memory.py: each configuration in its own process, the table with the ratios and the deviation; and
the server's load path keeps int8's saving in the process's resident memory (measured, each load in a fresh
process: a load that keeps the checkpoint's memory map or the freed fp32 pages ends above full precision)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_int8_keeps_its_saving_in_the_processs_memory_and_the_table_compares_it(tmp_path: Path) -> None:
    out = tmp_path / "tables.md"
    argv = ["--model", "random:small", "--configs", "full,int8", "--size", "64", "--steps", "1", "--images", "1"]
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "small_memory.py"),
            *argv,
            "--decode-size",
            "128",
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
    assert "| config | transformer weights (MiB) | RSS after load / peak generating (MiB) | images/s |" in table
    full, int8 = (re.search(rf"^\| {name} \| .*$", table, flags=re.M) for name in ("full", "int8"))
    assert full and "(1.00x)" in full.group(0) and "99.0 dB" in full.group(0)  # the reference against itself
    assert int8 and re.search(r"\| \d+ \(0\.[0-3]\dx\) \|", int8.group(0))  # weights: a third of fp32 or less
    rss = [int(re.search(r"\| (\d+) / \d+ \|", row.group(0)).group(1)) for row in (full, int8)]  # type: ignore[union-attr]
    # random:small's transformer: 233 MB in fp32, about 60 in int8: the process keeps most of the difference.
    assert rss[1] < rss[0] - 100, rss
    assert "VAE decode of one 128x128 image, peak added: plain" in table


def test_an_unknown_configuration_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "small_memory.py"), "--configs", "full,int4"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2 and "unknown configuration(s) int4" in done.stderr
