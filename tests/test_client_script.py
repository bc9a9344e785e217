"""``python test.py``, the client script for people, run as a subprocess against a live server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from http_helpers import open_png
from jobs_helpers import stored_jobs

REPO = Path(__file__).resolve().parent.parent


def run_client(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run test.py with ``args`` (and ``env`` added to this environment); never raises on a non-zero exit."""
    command = [sys.executable, str(REPO / "test.py"), *args]
    environ = {k: v for k, v in os.environ.items() if k != "SERVER_API_KEY"} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO, env=environ, check=False)


def printed_paths(stdout: str) -> list[Path]:
    return [Path(line) for line in stdout.splitlines() if line.endswith(".png")]


def test_downloads_every_image_and_prints_its_path(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server()
    out = tmp_path / "out"
    args = ["--url", server.url, "--steps", "2", "--images", "2", "--seed", "9", "--width", "96", "--height", "48"]
    result = run_client(*args, "--out", str(out), "--prompt", "a lighthouse")
    assert result.returncode == 0, result.stderr
    paths = printed_paths(result.stdout)
    assert len(paths) == 2
    assert sorted(paths) == sorted(out.iterdir())
    assert all(open_png(path.read_bytes()).size == (96, 48) for path in paths)
    assert "seed 9" in result.stdout
    assert server.engine.stats["completed"] == 1


def test_concurrency_prints_a_latency_summary(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server(max_concurrency=2)
    out = tmp_path / "out"
    result = run_client("--url", server.url, "--steps", "2", "--concurrency", "4", "--seed", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(printed_paths(result.stdout)) == 4 == len(list(out.iterdir()))
    assert "4 sent, 4 ok, 0 failed" in result.stdout
    for word in ("mean", "p50", "p95", "max", "images/s"):
        assert word in result.stdout
    assert server.engine.stats["completed"] == 4


def test_server_errors_are_explained_and_exit_non_zero(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server(api_key="sesame")
    out = tmp_path / "out"
    common = ["--url", server.url, "--steps", "2", "--out", str(out)]
    no_key = run_client(*common)
    assert no_key.returncode == 1
    assert "HTTP 401" in no_key.stderr and "API key" in no_key.stderr

    bad_size = run_client(*common, "--api-key", "sesame", "--width", "70")
    assert bad_size.returncode == 1
    assert "HTTP 400: width: must be a multiple of 16; try 64 or 80" in bad_size.stderr
    assert not out.exists() or not any(out.iterdir())

    with_key = run_client(*common, "--api-key", "sesame")
    assert with_key.returncode == 0, with_key.stderr
    assert len(printed_paths(with_key.stdout)) == 1

    # The server's own variable is the client's default key; --api-key still wins.
    from_env = run_client(*common, env={"SERVER_API_KEY": "sesame"})
    assert from_env.returncode == 0, from_env.stderr
    wrong_flag = run_client(*common, "--api-key", "wrong", env={"SERVER_API_KEY": "sesame"})
    assert wrong_flag.returncode == 1 and "HTTP 401" in wrong_flag.stderr


def test_without_httpx_it_says_where_to_get_it_and_exits_2() -> None:
    """Run outside the server's virtual environment (no httpx there): one line saying what to do, no traceback."""
    hide_httpx = (
        "import runpy, sys; sys.modules['httpx'] = None; sys.argv = ['test.py', '--help']; "
        "runpy.run_path('test.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", hide_httpx], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert "test.py needs httpx" in result.stderr and ". .venv/bin/activate" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for extra in ([], ["--concurrency", "2"]):
        result = run_client("--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "out"), *extra)
        assert result.returncode == 1
        assert f"cannot connect to http://127.0.0.1:{port}" in result.stderr
        assert "is the server running" in result.stderr
        assert "Traceback" not in result.stderr


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    for args in (["--steps", "0"], ["--steps", "many"], ["--url", "localhost:8500"], ["--timeout", "0"]):
        result = run_client(*args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2, args
        assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_stream_shows_progress_then_downloads_the_same_images(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server(max_concurrency=1)
    args = ["--url", server.url, "--steps", "8", "--images", "2", "--seed", "9", "--width", "32", "--height", "32"]
    streamed = run_client(*args, "--out", str(tmp_path / "streamed"), "--stream")
    plain = run_client(*args, "--out", str(tmp_path / "plain"))
    assert streamed.returncode == 0 == plain.returncode, streamed.stderr
    paths = printed_paths(streamed.stdout)
    assert len(paths) == 2 and "seed 9" in streamed.stdout
    pixels_of = sorted(open_png(p.read_bytes()).tobytes() for p in paths)
    assert pixels_of == sorted(open_png(p.read_bytes()).tobytes() for p in printed_paths(plain.stdout))
    # Not a terminal: a line per quarter of the steps and per change of state, ending at all 8 steps.
    lines = streamed.stderr.splitlines()
    assert any("running" in line and "ETA" in line for line in lines), streamed.stderr
    assert lines[-1].startswith("[" + "#" * 24 + "] 8/8 steps") and "succeeded" in lines[-1], streamed.stderr
    assert len(lines) <= 12, streamed.stderr
    assert stored_jobs(server) == 1 and server.engine.stats["completed"] == 2


def test_stream_with_concurrency_and_a_queue(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server(max_concurrency=1, api_key="sesame")
    out = tmp_path / "out"
    common = ["--url", server.url, "--steps", "4", "--concurrency", "3", "--stream", "--out", str(out)]
    result = run_client(*common, "--api-key", "sesame")
    assert result.returncode == 0, result.stderr
    assert len(printed_paths(result.stdout)) == 3 and "3 sent, 3 ok, 0 failed" in result.stdout
    assert "queued" in result.stderr and "3 succeeded" in result.stderr.splitlines()[-1], result.stderr
    assert stored_jobs(server) == 3 and server.engine.stats["completed"] == 3

    no_key = run_client(*common)
    assert no_key.returncode == 1 and "HTTP 401" in no_key.stderr


def test_image_and_mask_edit_through_the_native_api(make_server: Callable[..., Any], tmp_path: Path) -> None:
    """--image: image-to-image at the image's size; --mask (white repaints): inpainting; the answer names the task."""
    from edits_helpers import encoded, noise, white_repaints

    server = make_server()
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    image.write_bytes(encoded(noise(48, 32)))
    mask.write_bytes(encoded(white_repaints((48, 32), (8, 8, 24, 32))))
    common = ["--url", server.url, "--steps", "2", "--seed", "4", "--prompt", "a boat"]
    edited = run_client(*common, "--image", str(image), "--strength", "0.5", "--out", str(tmp_path / "edited"))
    assert edited.returncode == 0, edited.stderr
    [path] = printed_paths(edited.stdout)
    assert open_png(path.read_bytes()).size == (48, 32)
    inpainted = run_client(*common, "--image", str(image), "--mask", str(mask), "--out", str(tmp_path / "inpainted"))
    assert inpainted.returncode == 0, inpainted.stderr
    [other] = printed_paths(inpainted.stdout)
    assert open_png(other.read_bytes()).tobytes() != open_png(path.read_bytes()).tobytes()
    assert server.engine.stats["completed"] == 2

    wrong = tmp_path / "small.png"
    wrong.write_bytes(encoded(noise(16, 16)))
    refused = run_client(*common, "--image", str(image), "--mask", str(wrong), "--out", str(tmp_path / "no"))
    assert refused.returncode == 1 and "HTTP 400: mask_image: is 16x16 and the image 48x32" in refused.stderr
    for args in (["--mask", str(mask)], ["--strength", "0.5"], ["--image", str(tmp_path / "missing.png")]):
        result = run_client("--url", server.url, *args, "--out", str(tmp_path / "no"))
        assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, args
