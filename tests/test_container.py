"""The image, compose and their README: the files agree with the server's options and with each other, the
HEALTHCHECK follows readiness, and (marked ``container``) the README's air-gapped build really builds an image that
serves, generates and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, wait_ready
from container_helpers import REPO, TEST_IMAGE, Container, build_image, image_config, readme_command
from http_helpers import NATIVE, fetch_png, open_png

from serverasync import Settings

CONTAINERFILE = (REPO / "Containerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
COMPOSE_GPU = yaml.safe_load((REPO / "compose.gpu.yaml").read_text())
HEALTHCHECK = REPO / "deploy" / "container" / "healthcheck.py"
# Options other branches add, which compose already uses; once the option exists, it is checked like any other.
PENDING = {"job_store"} - set(Settings.model_fields)


def containerfile_env() -> dict[str, str]:
    """Every ENV of the Containerfile (the ``A=1 \\`` continuation form), as a mapping."""
    text = CONTAINERFILE.replace("\\\n", " ")
    return {k: v for line in re.findall(r"^ENV (.+)$", text, flags=re.M) for k, v in re.findall(r"(\w+)=(\S+)", line)}


def containerfile_volumes() -> list[str]:
    [line] = re.findall(r"^VOLUME (.+)$", CONTAINERFILE, flags=re.M)
    return json.loads(line)


def server_option(variable: str) -> str:
    return variable.removeprefix("SERVER_").lower()


def test_the_containerfile_sets_real_options_and_runs_as_a_non_root_user() -> None:
    env = containerfile_env()
    variables = {name for name in env if name.startswith("SERVER_")}
    assert variables >= {"SERVER_DATA_DIR", "SERVER_HOST", "SERVER_PORT"}
    assert {server_option(v) for v in variables} <= set(Settings.model_fields), variables
    # One volume holds what the server keeps: its images and jobs (the data directory's) and the model cache.
    assert containerfile_volumes() == [env["SERVER_DATA_DIR"]] and env["HF_HOME"] == env["SERVER_DATA_DIR"] + "/hf"
    assert "SERVER_IMAGE_DIR" not in env and "SERVER_JOB_STORE" not in env  # the data directory's defaults
    [user] = re.findall(r"^USER (\S+)$", CONTAINERFILE, flags=re.M)
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and gid != 0
    assert f"--uid {uid}" in CONTAINERFILE  # the user exists in the image
    assert re.search(r'^ENTRYPOINT \["python", "serverasync.py"\]$', CONTAINERFILE, flags=re.M)
    assert re.search(r'CMD \["python", "deploy/container/healthcheck.py"\]', CONTAINERFILE)


def test_every_copy_of_the_torch_pin_is_cis() -> None:
    [ci] = re.findall(r"torch==([\d.]+)", (REPO / ".ci" / "run").read_text())
    assert re.findall(r"^ARG TORCH_VERSION=(\S+)$", CONTAINERFILE, flags=re.M) == [ci]
    for script in ("serve", "deploy/container/wheelhouse"):
        assert re.findall(r"^TORCH_VERSION=(\S+)$", (REPO / script).read_text(), flags=re.M) == [ci], script


def test_the_build_context_leaves_out_environments_caches_and_outputs() -> None:
    ignored = (REPO / ".containerignore").read_text()
    assert (REPO / ".dockerignore").read_text() == ignored  # docker reads the one, podman either
    patterns = {line for line in ignored.splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv*", "**/__pycache__", "images", "wheelhouse", "tests"} <= patterns
    assert "requirements.txt" not in patterns and "serverasync.py" not in patterns


def test_compose_runs_the_server_with_redis_and_the_images_volumes() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"server", "redis"}
    server = services["server"]
    assert server["build"] == {"context": ".", "dockerfile": "Containerfile"}
    env = dict(item.split("=", 1) if "=" in item else (item, None) for item in server["environment"])
    variables = {name for name in env if name.startswith("SERVER_")}
    assert {server_option(v) for v in variables} - set(Settings.model_fields) <= PENDING, variables
    assert env["SERVER_JOB_STORE"] == "redis://redis:6379/0"  # the redis service, by its name
    assert env["SERVER_MODEL"] == "${SERVER_MODEL:-random:tiny}" and "HF_TOKEN" in env
    mounts = dict(reversed(volume.split(":", 1)) for volume in server["volumes"])
    assert sorted(mounts) == sorted(containerfile_volumes())
    assert mounts[containerfile_env()["SERVER_DATA_DIR"]] == "data"
    assert set(mounts.values()) <= set(COMPOSE["volumes"])
    assert server["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    grace = float(server["stop_grace_period"].removesuffix("s"))
    assert grace > Settings().shutdown_timeout  # the drain finishes before compose kills
    assert server["ports"] == [f"8500:{containerfile_env()['SERVER_PORT']}"]


def test_the_gpu_override_asks_for_a_cuda_build_serve_knows_and_the_gpus() -> None:
    server = COMPOSE_GPU["services"]["server"]
    build = server["build"]["args"]["TORCH"]
    assert re.search(rf"\b{build}:", (REPO / "serve").read_text()), build  # one of serve's CUDA builds
    [device] = server["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}


def test_the_readmes_container_commands_are_the_files() -> None:
    build = readme_command("podman build --format docker --build-context")
    assert build[-3:] == ["-t", "sd3-server", "."] and "--build-context" in build
    base = readme_command("deploy/container/base")
    assert build[build.index("--build-arg") + 1] == f"BASE={base[1]}", (build, base)  # the base the page makes
    run = readme_command("podman run --rm -p")
    volumes = [run[i + 1].split(":")[1] for i, arg in enumerate(run) if arg == "-v"]
    assert sorted(volumes) == sorted(containerfile_volumes())
    assert run[run.index("-p") + 1] == f"8500:{containerfile_env()['SERVER_PORT']}"
    assert readme_command("deploy/container/wheelhouse") == ["deploy/container/wheelhouse", "wheelhouse"]


def _podman_compose_config(*files: str) -> dict[str, Any]:
    """What ``podman-compose config`` resolves from ``files`` (merged in order), as the page's check does."""
    tool = shutil.which("podman-compose") or shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.skip("needs podman-compose (requirements-test.txt; Debian: apt-get install podman-compose)")
    args = [arg for name in files for arg in ("-f", name)]
    env = {k: v for k, v in os.environ.items() if k not in ("SERVER_MODEL", "HF_TOKEN")}  # compose's defaults
    result = subprocess.run(
        [tool, *args, "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return yaml.safe_load(result.stdout)


def test_podman_compose_reads_the_compose_files_as_the_page_says() -> None:
    """The page's podman route: ``podman-compose config`` (it needs no image, makes nothing) on compose.yaml alone
    and with the GPU override resolves the server the files mean: built from the Containerfile, Redis as its store,
    its data on the named volume, the model from SERVER_MODEL's default."""
    plain = _podman_compose_config("compose.yaml")
    server = plain["services"]["server"]
    assert server["build"]["dockerfile"] == "Containerfile" and Path(server["build"]["context"]) == REPO
    assert server["environment"]["SERVER_JOB_STORE"] == "redis://redis:6379/0"
    assert server["environment"]["SERVER_MODEL"] == "random:tiny"
    assert server["volumes"] == [f"data:{containerfile_env()['SERVER_DATA_DIR']}"] and "data" in plain["volumes"]
    assert plain["services"]["redis"]["image"] == COMPOSE["services"]["redis"]["image"]
    gpu = _podman_compose_config("compose.yaml", "compose.gpu.yaml")["services"]["server"]
    assert gpu["build"]["args"] in (["TORCH=cu128"], {"TORCH": "cu128"}) and gpu["image"] == "sd3-server:cu128"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["volumes"] == server["volumes"]  # the override adds the GPUs, nothing else


def test_the_base_script_says_what_it_needs_and_refuses_unknown_options(tmp_path: Path) -> None:
    """``deploy/container/base`` (the registry-free base of the air-gapped build; the container test runs it for
    real) explains itself before doing anything."""
    script = str(REPO / "deploy" / "container" / "base")
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert shown.returncode == 0 and "--build-arg BASE=IMAGE" in shown.stdout, shown
    wrong = subprocess.run([script, "--bogus"], capture_output=True, text=True, timeout=30, check=False)
    assert wrong.returncode == 2 and "unknown option --bogus" in wrong.stderr, wrong
    (tmp_path / "bin").mkdir()  # a PATH with bash and coreutils' tools but no mmdebstrap
    for tool in ("bash", "sed", "cat", "grep", "head", "tr", "awk"):
        found = shutil.which(tool)
        if found:
            (tmp_path / "bin" / tool).symlink_to(found)
    env = {"PATH": str(tmp_path / "bin")}
    missing = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 2 and "needs mmdebstrap" in missing.stderr, missing


def run_healthcheck(port: int) -> int:
    env = {"SERVER_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, timeout=60, check=False).returncode


def test_the_healthcheck_is_healthy_only_while_the_server_is_ready(make_server: Any, tiny_pipeline: Any) -> None:
    release = threading.Event()

    def slow_loader(settings: Any) -> Any:
        import torch

        release.wait(60)
        return SimpleNamespace(pipeline=tiny_pipeline, device=torch.device("cpu"))

    live = make_server(loader=slow_loader, wait=False)
    port = int(live.url.rsplit(":", 1)[1])
    try:
        assert run_healthcheck(port) == 1  # up, loading: /ready says 503
    finally:
        release.set()
    wait_ready(live.url)
    assert run_healthcheck(port) == 0
    live.engine.start_draining()  # what SIGTERM does first
    assert run_healthcheck(port) == 1
    assert run_healthcheck(free_port()) == 1  # nothing listens


def _container_tools_missing() -> str | None:
    missing = [tool for tool in ("podman", "mmdebstrap", "tar") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} (.ci/run installs them with apt)" if missing else None


@pytest.fixture(scope="module")
def image() -> str:
    if reason := _container_tools_missing():
        pytest.skip(reason)
    log = build_image()
    # The air-gapped path: pip found everything in the wheelhouse and asked no index. A step podman took from its
    # cache was checked so by the build that made it (the test's base is the test's alone).
    [install] = [step for step in re.split(r"\n(?=\[\d+/\d+\] STEP )", log) if "RUN --mount" in step]
    if "--> Using cache" not in install:
        assert "Looking in links: /wheelhouse" in install and "Looking in indexes" not in install, install[-3000:]
    return TEST_IMAGE


@pytest.mark.container
def test_the_image_serves_generates_and_stops_cleanly_on_sigterm(
    image: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = image_config(image)
    assert config["User"] == "10001:10001" and config["Healthcheck"]["Test"][0] == "CMD"
    container = Container(image, free_port(), tmp_path)
    with capsys.disabled():
        print(f"\ncontainer test: the image ran by {container.way}")  # noqa: T201
    try:
        wait_ready(container.url, timeout=300)
        assert container.healthcheck() == 0
        status = httpx.get(container.url + "/api/status", timeout=30).json()
        assert (status["current_model"], status["device"]) == ("random:tiny", "cpu")
        body = {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 2}
        response = httpx.post(container.url + NATIVE, json=body, timeout=300)
        assert response.status_code == 200, response.text
        [url] = response.json()["response"]
        assert open_png(fetch_png(url)).size == (64, 64)
        assert [p.name for p in container.images.iterdir()] == [url.rsplit("/", 1)[1]]  # on the image volume
        assert container.alive()
        code = container.stop()
        assert code == 0, container.log()[-3000:]
        assert "draining" in container.log()
    finally:
        container.remove()
