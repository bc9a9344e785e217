"""``./serve``: from a fresh copy of the repository, one command makes the environment, installs, and serves; the
second run skips pip; a changed requirement or torch build reinstalls; the torch build follows the driver.

The environment is one ``./serve`` creates itself, in a temporary folder (``--venv``). Installing torch into it for
real would download hundreds of megabytes per run, so the installed packages of this test's own environment are put
on its ``PYTHONPATH``: pip then finds every requirement satisfied, and what is tested is the script's own logic (the
environment, the torch build, the stamp, pip run or skipped, the server started with the flags, signals reaching it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import free_port, wait_ready
from http_helpers import NATIVE, fetch_png, open_png

REPO = Path(__file__).resolve().parent.parent
[TORCH_PIN] = re.findall(r"^TORCH_VERSION=(\S+)$", (REPO / "serve").read_text(), flags=re.M)
BASE_VERSION, _, BUILD = torch.__version__.partition("+")

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or BASE_VERSION != TORCH_PIN or not BUILD,
    reason=f"needs Linux and this environment's torch to be serve's pin ({TORCH_PIN}+build), not {torch.__version__}",
)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the repository: its files as git sees them (committed or not), no environment, no stamp."""
    dest = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    assert os.access(dest / "serve", os.X_OK) and not (dest / ".venv").exists()
    return dest


def serve_env(venv: Path, **extra: str) -> dict[str, str]:
    packages = os.pathsep.join(site.getsitepackages())
    return {**os.environ, "SERVE_VENV": str(venv), "SERVE_PYTHON": sys.executable, "PYTHONPATH": packages, **extra}


def dry_run(clone: Path, venv: Path, *args: str, env: dict[str, str] | None = None) -> str:
    command = [str(clone / "serve"), "--dry-run", *args, "--model", "random:tiny"]
    result = subprocess.run(
        command, cwd=clone, env=env or serve_env(venv), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def serve_once(clone: Path, venv: Path, tmp: Path) -> str:
    """Run ./serve, generate an image through the server it started, SIGTERM it; its output. It must exit 0."""
    port = free_port()
    images = tmp / f"images-{port}"
    command = [str(clone / "serve"), "--torch", BUILD, "--model", "random:tiny", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--image-dir", str(images), "--default-steps", "2"]
    log_path = tmp / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=tmp, env=serve_env(venv), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=600, proc=proc)
        # The script exec'd the server: the process signals reach is the server itself.
        assert b"serverasync.py" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        response = httpx.post(url + NATIVE, json={"prompt": "a lighthouse", "seed": 3}, timeout=120)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["parameters"]["num_inference_steps"] == 2  # the flags reached the server
        [image] = answer["response"]
        assert open_png(fetch_png(image)).size == (64, 64)
        assert [p.name for p in images.iterdir()] == [image.rsplit("/", 1)[1]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def installed(clone: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The first run, into an environment that does not exist yet: the environment and the first run's output."""
    tmp = tmp_path_factory.mktemp("serve")
    venv = tmp / "venv"
    return venv, serve_once(clone, venv, tmp)


@pytest.mark.slow
def test_the_first_run_creates_the_environment_installs_and_serves(installed: tuple[Path, str]) -> None:
    venv, log = installed
    assert f"serve: environment: {venv} (creating it with {sys.executable})" in log, log
    assert f"serve: installing torch=={TORCH_PIN}+{BUILD} and requirements.txt (not installed yet)" in log
    assert f"Requirement already satisfied: torch=={TORCH_PIN}+{BUILD}" in log  # pip ran
    assert "Requirement already satisfied: diffusers" in log  # both installs ran
    assert (venv / "bin" / "python").exists() and len((venv / ".serve-stamp").read_text().strip()) == 64
    assert "draining" in log and "Traceback" not in log


def test_the_second_run_skips_pip_and_serves(installed: tuple[Path, str], clone: Path, tmp_path: Path) -> None:
    venv, _ = installed
    stamp = (venv / ".serve-stamp").read_text()
    log = serve_once(clone, venv, tmp_path)
    assert f"serve: environment: {venv} (reused)" in log, log
    assert "serve: requirements unchanged since the last install: skipping pip" in log
    assert "Requirement already satisfied" not in log and "installing" not in log  # pip did not run
    assert (venv / ".serve-stamp").read_text() == stamp


def test_a_changed_requirement_or_torch_build_reinstalls(installed: tuple[Path, str], clone: Path) -> None:
    venv, _ = installed
    assert "skipping pip" in dry_run(clone, venv, "--torch", BUILD)
    other = "cu128" if BUILD != "cu128" else "cpu"
    assert f"would install torch=={TORCH_PIN}+{other} and requirements.txt (changed)" in dry_run(
        clone, venv, "--torch", other
    )
    requirements = clone / "requirements.txt"
    before = requirements.read_text()
    try:
        requirements.write_text(before + "rich>=13\n")
        assert "would install" in dry_run(clone, venv, "--torch", BUILD)
    finally:
        requirements.write_text(before)
    assert "skipping pip" in dry_run(clone, venv, "--torch", BUILD)


def nvidia_smi_stand_in(folder: Path, cuda: str) -> dict[str, str]:
    """A PATH whose first nvidia-smi prints the header line of the real one for a driver supporting ``cuda``: the
    GPU this machine lacks, to check the choice the script makes from that line."""
    folder.mkdir(exist_ok=True)
    tool = folder / "nvidia-smi"
    header = f"| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: {cuda}     |"
    tool.write_text(f"#!/bin/sh\necho '{header}'\n")
    tool.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("cuda", "build"),
    [("13.0", "cu130"), ("13.2", "cu130"), ("12.9", "cu128"), ("12.8", "cu128"), ("12.7", "cu126"), ("12.6", "cu126")],
)
def test_the_torch_build_is_the_newest_the_driver_supports(clone: Path, tmp_path: Path, cuda: str, build: str) -> None:
    env = serve_env(tmp_path / "venv", **nvidia_smi_stand_in(tmp_path / "bin", cuda))
    out = dry_run(clone, tmp_path / "venv", env=env)
    assert f"serve: torch: torch=={TORCH_PIN}+{build} from https://download.pytorch.org/whl/{build} " in out, out
    assert f"(nvidia-smi: the driver supports CUDA {cuda})" in out
    assert f"serve: environment: {tmp_path / 'venv'} (would be created by" in out and not (tmp_path / "venv").exists()


def test_a_driver_older_than_every_cuda_build_gets_the_cpu_build(clone: Path, tmp_path: Path) -> None:
    env = serve_env(tmp_path / "venv", **nvidia_smi_stand_in(tmp_path / "bin", "12.4"))
    out = dry_run(clone, tmp_path / "venv", env=env)
    assert f"torch=={TORCH_PIN}+cpu from https://download.pytorch.org/whl/cpu" in out
    assert "supports CUDA 12.4, older than every CUDA build" in out


def test_this_machines_driver_decides_and_an_explicit_build_wins(clone: Path, tmp_path: Path) -> None:
    out = dry_run(clone, tmp_path / "venv")
    real = shutil.which("nvidia-smi")
    if real is None:
        assert f"torch=={TORCH_PIN}+cpu" in out and "no NVIDIA driver (nvidia-smi) found: the CPU build" in out, out
    else:  # a GPU machine: the line nvidia-smi really prints decides
        cuda = re.search(r"CUDA Version: *([\d.]+)", subprocess.run([real], capture_output=True, text=True).stdout)
        assert cuda and f"(nvidia-smi: the driver supports CUDA {cuda.group(1)}" in out, out
    mirror = {"SERVE_TORCH": "cu126", "SERVE_TORCH_INDEX": "https://mirror.example/whl"}
    out = dry_run(clone, tmp_path / "venv", env=serve_env(tmp_path / "venv", **mirror))
    asked = f"torch=={TORCH_PIN}+cu126 from https://mirror.example/whl/cu126 (asked for with --torch or SERVE_TORCH)"
    assert asked in out
    assert "would run: " in out and "serverasync.py --model random:tiny" in out


def test_an_unknown_torch_build_exits_2_saying_what_it_takes(clone: Path, tmp_path: Path) -> None:
    command = [str(clone / "serve"), "--torch", "rocm", "--model", "random:tiny"]
    env = serve_env(tmp_path / "venv")
    result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "serve: error: --torch must be auto, cpu or one of PyTorch's CUDA builds" in result.stderr
    assert not (tmp_path / "venv").exists()  # refused before anything was made
