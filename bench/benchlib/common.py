"""What every part of the benchmark uses: the repository root, byte units and the progress log."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the server's own modules (Pipelines, utils, serverasync.py) live there
MIB = 1 << 20
GIB = 1 << 30


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def publish(text: str, markdown: Path | None) -> None:
    """The report to stdout, and appended to ``markdown`` (e.g. bench/RESULTS.md) when one is given."""
    print(text)
    if markdown is not None:
        with markdown.open("a") as handle:
            handle.write("\n" + text + "\n")
