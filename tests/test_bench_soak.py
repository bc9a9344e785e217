"""bench/soak_memory.py, run small: both engines' servers side by side, one column set each, the heap probe
answering (its shape, never its figures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_soak_smoke_run_samples_both_servers_and_their_heaps(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    command = [sys.executable, str(REPO / "bench" / "soak_memory.py"), "--smoke", "--heap", "--markdown", str(report)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    assert done.stdout.strip() in text  # what it printed is what it appended
    per = ["RSS", "peak in block", "malloc in use", "malloc free, kept", "arenas", "threads"]
    header = "| | " + " | ".join(f"{engine}: {what}" for engine in ("threads", "step") for what in per) + " |"
    assert header in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| |")}  # fmt: skip
    labels = ["after warm-up", "after 8", "after 16", "after malloc_trim(0)"]
    assert list(rows)[:4] == labels
    for label in labels:
        threads, step = rows[label][:6], rows[label][6:]
        for cells in (threads, step):
            assert int(cells[0].replace(",", "")) > 100  # a loaded server's RSS, MiB
            assert int(cells[2].replace(",", "")) > 10 and int(cells[4]) >= 1  # the probe answered: heap, arenas
    assert rows["after 8"][1] != "-" and rows["after warm-up"][1] == "-"  # a peak for the blocks only
    assert [rows["**failed requests**"][0], rows["**failed requests**"][6]] == ["0", "0"]
    assert re.search(r"^\| \*\*growth over the second half\*\* \| [+-]\d+ \| [+-]\d+ \|", text, flags=re.M)
    assert re.search(r"- step: .* answered: \d+ image-to-image, \d+ inpainting, \d+ text-to-image", text)
    assert "malloc_trim(0) at the end took" in text and "soak_memory.py --smoke --heap" in text


def test_soak_refuses_an_unknown_engine_and_odd_sizes() -> None:
    for flags, message in ((["--engines", "threads,warp"], "unknown warp"), (["--sizes", "40"], "multiples of 16")):
        command = [sys.executable, str(REPO / "bench" / "soak_memory.py"), *flags]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_conv_cache_prints_both_rounds() -> None:
    command = [sys.executable, str(REPO / "bench" / "conv_cache.py"), "--sizes", "32,48", "--max-batch", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [cells[0].strip() for cells in rows] == ["round", "first round", "second round, the same shapes"]
    for cells in rows[1:]:
        assert cells[1].strip() == "12" and all(re.fullmatch(r"[+-]\d+\.\d", c.strip()) for c in cells[2:])
