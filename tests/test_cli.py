"""``python serverasync.py``: its options, its validation before any model loads, and a real end-to-end run."""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import torch
from http_helpers import NATIVE, fetch_png, open_png

from serverasync import Settings

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "Pipelines",
    "utils",
    "engine",
    "models.random_build",
    "fastapi.testclient",
)


def run_server_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "serverasync.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=False)


def test_help_lists_every_option() -> None:
    result = run_server_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in result.stdout, f"{flag} missing from --help"
    assert "SERVER_" in result.stdout  # says every flag is also an environment variable


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-queue", "-1"], "--max-queue: Input should be greater than or equal to 0"),
        (["--port", "http"], "--port: Input should be a valid integer"),
        (["--port", "70000"], "--port: Input should be less than or equal to 65535"),
        (["--max-concurrency", "0"], "--max-concurrency: Input should be greater than or equal to 1"),
        (["--public-url", "img.example.com"], "--public-url: public_url must start with http:// or https://"),
        (["--type-models", "img2img"], "--type-models: type_models must be 't2im'"),
        (["--log-level", "loud"], "--log-level: log_level must be debug, info, warning or error"),
        (["--default-steps", "200"], "default_steps (200) is above max_steps (100)"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--image-max-files", "3"], "image_max_files (3) cannot hold one request's 10 images"),
        (["--image-max-bytes", "1000"], "image_max_bytes (1000) cannot hold one request's images"),
        (["--image-ttl", "60", "--image-grace", "120"], "image_ttl (60) is below image_grace (120)"),
        (["--job-ttl", "30", "--job-grace", "60"], "job_ttl (30) is below job_grace (60)"),
        (["--job-grace", "-1"], "--job-grace: Input should be greater than or equal to 0"),
        (["--max-header-bytes", "100"], "--max-header-bytes: Input should be greater than or equal to 1024"),
        (["--send-timeout", "0"], "--send-timeout: Input should be greater than 0"),
        (["--engine", "turbo"], "--engine: engine must be 'threads' or 'step'"),
        (["--engine", "threads", "--compile"], "compile needs --engine step"),
        (["--max-batch-size", "0"], "--max-batch-size: Input should be greater than or equal to 1"),
        (["--prompt-cache-size", "-1"], "--prompt-cache-size: Input should be greater than or equal to 0"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_invalid_option_exits_2_before_loading_a_model(args: list[str], words: str) -> None:
    # A model path that does not exist: had the server got as far as loading, the error would be about it.
    result = run_server_cli("--model", "/nonexistent/model", *args)
    assert result.returncode == 2
    assert f"serverasync.py: error: {words}" in result.stderr, result.stderr
    assert "nonexistent" not in result.stderr and "Traceback" not in result.stderr
    assert "None:" not in result.stderr


def test_invalid_environment_variable_exits_2_naming_the_variable() -> None:
    env = {**os.environ, "SERVER_MAX_QUEUE": "-3", "MODEL_PATH": "random:nope"}
    result = run_server_cli("--max-concurrency", "0", env=env)
    assert result.returncode == 2
    # What the user set, in the form they set it: the variable, or the flag.
    assert "error: SERVER_MAX_QUEUE: Input should be greater than or equal to 0" in result.stderr, result.stderr
    assert "error: --max-concurrency: Input should be greater than or equal to 1" in result.stderr
    assert "--max-queue" not in result.stderr


def help_entries() -> dict[str, str]:
    """--help, one entry per flag: the flag's whole help text."""
    result = run_server_cli("--help")
    assert result.returncode == 0, result.stderr
    entries: dict[str, str] = {}
    flag = None
    for line in result.stdout.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            entries[flag] = line
        elif flag is not None and line.startswith("      "):
            entries[flag] += " " + line.strip()
    return entries


def test_help_gives_one_default_per_flag_and_lists_the_dtypes() -> None:
    entries = help_entries()
    assert set(entries) >= {"--" + name.replace("_", "-") for name in Settings.model_fields}
    for flag, text in entries.items():
        if flag != "--help":
            assert text.count("(default:") == 1 and "[default:" not in text, text
    for name in ("auto", "float32", "bfloat16", "float16"):
        assert name in entries["--dtype"]


def test_help_names_the_engine_the_server_picks() -> None:
    from api.loading import engine_kind

    text = help_entries()["--engine"]
    default = re.search(r"\(default: ([^)]*)\)", text).group(1)
    assert default.startswith("threads,") and "CPU" not in default, text
    # What --help promises is what the code does, on every device, and --compile implies step.
    for device in ("cpu", "cuda", "mps"):
        assert engine_kind(Settings(), device) == "threads"
        assert engine_kind(Settings(compile=True), device) == "step"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--dtype", "float8"], "--dtype: dtype must be auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)"),
        (["--device", "gpu"], "--device: device must be auto, cpu, mps, cuda or cuda:N"),
        (["--device", "cuda:99"], "device 'cuda:99' was asked for but"),
        *([(["--device", "cuda"], "device 'cuda' was asked for but CUDA is not available")] if not CUDA else []),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_device_and_dtype_are_checked_before_loading(args: list[str], words: str) -> None:
    result = run_server_cli("--model", "random:tiny", "--port", "0", *args)
    assert result.returncode == 2, result.stderr
    assert f"serverasync.py: error: {words}" in result.stderr, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "serving" not in output and "Built random" not in output


def test_a_model_too_large_for_the_memory_is_refused_before_allocating() -> None:
    # An address-space limit stands in for a small machine: on any machine the preset cannot fit under it.
    limit = 12 * 2**30

    def small_machine() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, str(REPO / "serverasync.py"), "--model", "random:sd3.5-medium", "--device", "cpu"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=REPO, preexec_fn=small_machine, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    first, hint = result.stderr.strip().splitlines()[-2:]
    assert re.search(r"error: random:sd3\.5-medium needs about 31\.6 GB .* in float32, but cpu has [\d.]+ GB", first)
    assert "--dtype bfloat16 (about 25.3 GB)" in hint and "--model random:tiny" in hint, hint
    assert "Traceback" not in result.stderr and "Built random" not in result.stderr


def test_weights_needed_by_the_presets_match_the_readme() -> None:
    """The figures on the documentation's models page (once the README's "Models" section)."""
    from Pipelines import required_bytes

    models_page = (REPO / "docs" / "operations" / "models.md").read_text()
    for preset, dtype, figure in (
        ("random:sd3.5-medium", torch.float32, "31.6 GB"),
        ("random:sd3.5-medium", torch.bfloat16, "25.3 GB"),
        ("random:tiny", torch.float32, "1.4 MB"),
        ("random:tiny", torch.float16, "0.9 MB"),
    ):
        need = required_bytes(preset, dtype)
        assert need is not None
        shown = f"{need / 1e9:.1f} GB" if need > 1e9 else f"{need / 1e6:.1f} MB"
        assert shown == figure and figure in models_page, (preset, dtype, shown)
    assert required_bytes("stabilityai/stable-diffusion-3.5-medium", torch.float32) is None  # unknown before load


def test_port_in_use_exits_3_at_once_with_a_hint(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server_cli("--host", "127.0.0.1", "--port", str(port), "--model", "random:tiny")
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"serverasync.py: error: cannot listen on 127.0.0.1:{port}: Address already in use",
        "Hint: another process uses that port: stop it, or choose another with --port (0 picks a free one)",
    ], result.stderr
    assert "serving" not in result.stdout + result.stderr  # nothing was loaded


@pytest.mark.slow
def test_start_up_log_says_what_matters_once(
    spawn_server: Callable[..., Any], tiny_pipeline: Any, tmp_path: Path
) -> None:
    saved = tmp_path / "saved"
    tiny_pipeline.save_pretrained(saved)  # a local checkpoint, loaded through from_pretrained
    everywhere = spawn_server("--host", "0.0.0.0", "--model", str(saved)).wait_ready()
    log = everywhere.log()
    assert f"serving {saved} on cpu as float32 (engine: threads) at http://0.0.0.0:{everywhere.port}" in log
    assert "listening on all interfaces with no API key" in log
    for noise in ("torchvision", "torch_dtype", "FutureWarning", "Uvicorn running", "Traceback"):
        assert noise not in log, noise

    local = spawn_server("--model", "random:tiny").wait_ready()
    assert "serving random:tiny on cpu" in local.log() and "no API key" not in local.log()
    keyed = spawn_server("--host", "0.0.0.0", "--model", "random:tiny", env={"SERVER_API_KEY": "k"}).wait_ready()
    assert "no API key" not in keyed.log()


def test_a_load_error_is_printed_once_and_exits_1(spawn_server: Callable[..., Any]) -> None:
    failed = spawn_server("--model", "/nonexistent/model-dir")
    assert failed.proc.wait(timeout=120) == 1
    log = failed.log()
    assert log.count("does not exist") == 1 and log.count("Hint:") == 1, log
    assert "Traceback" not in log


def test_validation_happens_before_anything_heavy_is_imported() -> None:
    code = (
        "import sys, serverasync\n"
        "rc = serverasync.main(['--model', 'random:tiny', '--max-queue', '-1'])\n"
        f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.split() == ["2", "[]"], result.stdout + result.stderr


def test_importing_serverasync_loads_nothing_heavy() -> None:
    code = f"import sys, json, serverasync\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def raw_http10_post(host: str, port: int, body: dict[str, Any]) -> dict[str, Any]:
    """POST with HTTP/1.0 and no Host header at all, over a bare socket; the JSON answer."""
    data = json.dumps(body).encode()
    head = f"POST {NATIVE} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(head.encode() + data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    status_line, _, rest = b"".join(chunks).partition(b"\r\n")
    assert b" 200 " in status_line, status_line
    return json.loads(rest.partition(b"\r\n\r\n")[2])


def test_cli_server_serves_end_to_end_with_client_facing_urls(spawn_server: Callable[..., Any]) -> None:
    # Bound to every interface: the links must still name an address the client can reach, never 0.0.0.0.
    server = spawn_server("--host", "0.0.0.0", "--default-steps", "2", "--max-concurrency", "2")
    server.wait_ready()
    response = httpx.post(server.url + NATIVE, json={"prompt": "a lighthouse", "seed": 3}, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["parameters"]["num_inference_steps"] == 2
    [url] = answer["response"]
    assert url.startswith(server.url + "/images/")
    assert open_png(fetch_png(url)).size == (64, 64)

    status = httpx.get(server.url + "/api/status").json()
    assert (status["current_model"], status["device"], status["max_concurrency"]) == ("random:tiny", "cpu", 2)

    no_host = raw_http10_post("127.0.0.1", server.port, {"prompt": "a lighthouse", "seed": 3})
    [url] = no_host["response"]
    assert urlparse(url).hostname == "127.0.0.1", url  # the address the client connected to
    assert open_png(fetch_png(url)).size == (64, 64)


@pytest.mark.slow
def test_a_long_generation_logs_that_it_is_alive_at_the_interval(spawn_server: Callable[..., Any]) -> None:
    """--progress-log-interval: a generation running longer than the interval logs its step, request id and time
    on the console at that interval, and only then (a short one logs nothing)."""
    server = spawn_server("--progress-log-interval", "0.05", "--max-steps", "200").wait_ready()
    long = {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 120, "width": 128, "height": 128}
    response = httpx.post(server.url + NATIVE, json=long, timeout=300)
    assert response.status_code == 200, response.text
    rid = response.headers["x-request-id"]
    lines = re.findall(rf"request {re.escape(rid)}: step (\d+)/120 after ([0-9.]+) s", server.log())
    assert len(lines) >= 2, server.log()[-2000:]
    steps, seconds = [int(step) for step, _ in lines], [float(t) for _, t in lines]
    assert steps == sorted(set(steps)) and seconds == sorted(seconds) and steps[-1] <= 120

    quiet = spawn_server("--max-steps", "200").wait_ready()  # the default interval, 10 s: longer than this request
    response = httpx.post(quiet.url + NATIVE, json={**long, "num_inference_steps": 4}, timeout=300)
    assert response.status_code == 200, response.text
    assert ": step " not in quiet.log()


def test_sigterm_while_the_model_loads_exits_at_once(tmp_path: Path) -> None:
    import signal
    import time

    from conftest import free_port

    port = free_port()
    # A load that takes 10 minutes (a big checkpoint from a slow disk, say), through main()'s loader argument.
    script = (
        "import sys, time, serverasync; "
        f"sys.exit(serverasync.main(['--model', 'random:tiny', '--host', '127.0.0.1', '--port', '{port}', "
        f"'--image-dir', {str(tmp_path / 'images')!r}], loader=lambda settings: time.sleep(600)))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 503:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
        assert b"exiting without waiting for the load" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
