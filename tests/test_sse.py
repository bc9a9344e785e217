"""The SSE encoder (api/sse.py): every event is readable by clients that split lines like ``str.splitlines`` (httpx's
``iter_lines``, ``test.py --stream``), whatever characters a prompt holds; checked on the encoder and end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_helpers import follow, submit

from api.sse import comment, sse_event

REPO = Path(__file__).resolve().parent.parent
# Every character str.splitlines breaks a line at (\n, \r, \x0b, \x0c, \x1c-\x1e, U+0085, U+2028, U+2029).
SEPARATORS = "".join(c for c in map(chr, range(0x110000)) if len(f"a{c}b".splitlines()) > 1)
PROMPT = "a lighthouse " + " ".join(SEPARATORS) + " at dusk"


def test_the_separators_are_the_ones_splitlines_knows() -> None:
    assert SEPARATORS == "\n\x0b\x0c\r\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("separator", list(SEPARATORS), ids=lambda c: f"U+{ord(c):04X}")
def test_an_event_is_one_data_line_whatever_its_text_holds(separator: str) -> None:
    data = {"prompt": f"before{separator}after", f"key{separator}": [separator]}
    encoded = sse_event(data, event="done", event_id=7).decode()
    lines = encoded.splitlines()
    assert lines == ["event: done", "id: 7", lines[2], ""], lines
    assert lines[2].startswith("data: ") and json.loads(lines[2][len("data: ") :]) == data
    with pytest.raises(ValueError, match="one line"):
        sse_event({}, event=f"a{separator}b")
    with pytest.raises(ValueError, match="one line"):
        comment(f"a{separator}b")


def test_a_job_whose_prompt_holds_every_separator_is_readable_by_line_splitting_clients(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    live = make_server()
    body = {"prompt": PROMPT, "negative_prompt": PROMPT, "num_inference_steps": 2, "seed": 3}
    with httpx.Client(base_url=live.url, timeout=120) as client:
        job = submit(client, body)
        events = follow(client, job)  # httpx's iter_lines, which splits like str.splitlines
    done = events[-1][1]
    assert done["status"] == "succeeded", done
    assert done["result"]["parameters"]["prompt"] == PROMPT == done["result"]["parameters"]["negative_prompt"]

    # test.py --stream follows its job's events the same way; it must see the job succeed.
    command = [sys.executable, str(REPO / "test.py"), "--url", live.url, "--stream", "--steps", "2"]
    result = subprocess.run(
        [*command, "--prompt", PROMPT, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "out").iterdir())) == 1
