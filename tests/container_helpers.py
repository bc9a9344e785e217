"""Building the server's image with podman and running it, on machines that allow less than a laptop does.

What the CI machines allow (measured): no base image can be pulled, so the base is made by the documented
``deploy/container/base`` (mmdebstrap from the Debian mirror apt is configured with); ``podman build`` needs
``--isolation chroot`` (no cgroup controllers); pip inside a build cannot verify the registry's certificate chain, so
the build installs from a wheelhouse (the air-gapped path the documentation gives users); and ``podman run`` may be
refused (the runtime may not set rlimits): then the image's own entrypoint runs from its exported file system under
``chroot``, with the image's environment, working directory and user. The commands of the documentation's container
page (docs/operations/container.md) are the ones run here, with this machine's paths put in (``readme_command``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTAINER_PAGE = REPO / "docs" / "operations" / "container.md"
BASE_REPOSITORY = "localhost/sd3-server-test-base"
TEST_IMAGE = "localhost/sd3-server:test"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd3-server"


def container_section() -> str:
    """The documentation's container page: the image, compose and the air-gapped build (once the README's
    "Container" section)."""
    return CONTAINER_PAGE.read_text()


def readme_command(prefix: str) -> list[str]:
    """The one command line of the container page's shell blocks that starts with ``prefix``, as arguments."""
    lines = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", container_section(), flags=re.S)
        for line in block.splitlines()
    ]
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return shlex.split(found[0])


def replace_option(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with the value after ``option`` (or of ``option=...``) replaced; the option must be there."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == option:
            out[i + 1] = value
            return out
        if arg.startswith(option + "="):
            out[i] = f"{option}={value}"
            return out
    raise AssertionError(f"{option} not in {args}")


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result


def local_base() -> str:
    """The base made by the page's ``deploy/container/base`` command, tagged by the script's hash: made once and kept
    in podman's storage, made again (the older one removed) when the script changes."""
    tag = hashlib.sha256((REPO / "deploy" / "container" / "base").read_bytes()).hexdigest()[:12]
    image = f"{BASE_REPOSITORY}:{tag}"
    if podman("image", "exists", image, check=False).returncode == 0:
        return image
    command = readme_command("deploy/container/base")
    assert len(command) == 2, command  # the script and the image's name
    result = subprocess.run([command[0], image], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY).stdout.split()
    for old in set(listed) - {image}:  # 220 MB each: the ones an older script made (tagged by its hash too)
        if re.fullmatch(rf"{BASE_REPOSITORY}:[0-9a-f]{{12}}", old):
            podman("rmi", old, check=False)
    return image


def wheelhouse() -> Path:
    """The documented wheelhouse, made by its command with this machine's pip configuration, and cached in ~/.cache
    (keyed by the requirements, the script and this Python): later runs reuse it without running pip at all."""
    key = hashlib.sha256()
    for name in ("requirements.txt", "deploy/container/wheelhouse"):
        key.update((REPO / name).read_bytes())
    key.update(f"{sys.version_info[:2]}".encode())
    dest = CACHE / "wheelhouse" / key.hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    for old in (CACHE / "wheelhouse").glob("*"):  # one wheelhouse kept: a few hundred MB each
        shutil.rmtree(old, ignore_errors=True)
    command = readme_command("deploy/container/wheelhouse")
    command[1] = str(dest)
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (dest / ".complete").write_text(result.stdout)
    return dest


def build_image() -> str:
    """The documented air-gapped build, from the local base and the cached wheelhouse; podman's log of it."""
    command = readme_command("podman build --format docker --build-context")
    command = replace_option(command, "--build-context", f"wheelhouse={wheelhouse()}")
    command = replace_option(command, "--build-arg", f"BASE={local_base()}")
    command = replace_option(command, "-t", TEST_IMAGE)
    assert command[-1] == "."
    machine = ["--isolation", "chroot"]
    before = podman("image", "inspect", "--format", "{{.Id}}", TEST_IMAGE, check=False).stdout.strip()
    result = podman(*command[1:-1], *machine, str(REPO), timeout=900)
    if before and before != podman("image", "inspect", "--format", "{{.Id}}", TEST_IMAGE).stdout.strip():
        podman("rmi", before, check=False)  # the previous run's image, untagged now: 1.5 GB each
    return result.stdout + result.stderr


def image_config(image: str) -> dict[str, Any]:
    [info] = json.loads(podman("image", "inspect", image).stdout)
    return {**info["Config"], "Healthcheck": info.get("Healthcheck") or info.get("HealthCheck") or {}}


class Container:
    """The image running: by ``podman run`` where the runtime allows it, else its entrypoint under chroot."""

    way: str

    def __init__(self, image: str, port: int, tmp: Path) -> None:
        self.image, self.port, self.tmp = image, port, tmp
        self.url = f"http://127.0.0.1:{port}"
        self.config = image_config(image)
        run = readme_command("podman run --rm -p")
        self.server_args = run[run.index("sd3-server") + 1 :]
        self.env = dict(arg.split("=", 1) for arg in _values(run, "-e") if "=" in arg)
        self.env["HF_HUB_OFFLINE"] = "1"  # the random presets need no hub: nothing may try it
        self._cid: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._start_podman(run) or self._start_chroot()

    def _start_podman(self, run: list[str]) -> bool:
        volumes = {target: self.tmp / Path(target).name for target in self.config["Volumes"]}
        name = f"sd3-server-test-{self.port}"
        args = ["run", "-d", "--name", name, "-p", f"127.0.0.1:{self.port}:8500"]
        for target, source in volumes.items():
            source.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:  # the image's user writes there (rootless podman maps it itself)
                os.chown(source, *self._ids())
            args += ["-v", f"{source}:{target}"]
        args += [f"-e{name}={value}" for name, value in self.env.items()]
        result = podman(*args, self.image, *self.server_args, check=False)
        if result.returncode == 0:
            self._cid = result.stdout.strip()
            self.images = volumes["/data"] / "images"
            self.way = "podman run"
            return True
        self.refusal = result.stderr.strip().splitlines()[-1:]
        podman("rm", "-f", name, check=False)  # created, never started
        return False

    def _start_chroot(self) -> None:
        if os.geteuid() != 0:
            pytest.skip(f"podman run was refused ({' '.join(self.refusal)}) and chroot needs root")
        root = self.tmp / "rootfs"
        root.mkdir()
        cid = podman("create", self.image).stdout.strip()
        try:
            export = f"podman export {cid} | tar -x -C {shlex.quote(str(root))}"
            subprocess.run(["bash", "-o", "pipefail", "-c", export], check=True, timeout=600)
        finally:
            podman("rm", cid, check=False)
        self.root = root
        self.proc_mounted = subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")]).returncode == 0
        self.images = root / "data" / "images"
        self.log_path = self.tmp / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [*self.config["Entrypoint"], *self.server_args]
        self._proc = subprocess.Popen(
            command, env=self._chroot_env(), preexec_fn=self._enter, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.way = f"chroot into the exported image (podman run was refused: {' '.join(self.refusal)})"

    def _ids(self) -> tuple[int, int]:
        uid, gid = self.config["User"].split(":")
        return int(uid), int(gid)

    def _chroot_env(self) -> dict[str, str]:
        env = dict(item.split("=", 1) for item in self.config["Env"])
        # On this machine's network, so bound to loopback on a free port, like the container's published port.
        return {**env, **self.env, "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(self.port)}

    def _enter(self) -> None:
        """In the child: the image's root, working directory and (numeric, non-root) user."""
        uid, gid = self._ids()
        os.chroot(self.root)
        os.chdir(self.config["WorkingDir"])
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        state = podman("inspect", "--format", "{{.State.Running}}", str(self._cid), check=False).stdout
        return state.strip() == "true"

    def healthcheck(self) -> int:
        """The image's own HEALTHCHECK command, run where the server runs; its exit status."""
        if self._cid is not None:
            return podman("healthcheck", "run", self._cid, check=False).returncode
        test = self.config["Healthcheck"]["Test"]
        assert test[0] == "CMD", test
        return subprocess.run(test[1:], env=self._chroot_env(), preexec_fn=self._enter, timeout=60).returncode

    def stop(self) -> int:
        """SIGTERM, as ``podman stop`` sends it; the exit status once drained."""
        if self._cid is not None:
            podman("stop", "-t", "60", self._cid, timeout=120)
            code = podman("inspect", "--format", "{{.State.ExitCode}}", self._cid).stdout.strip()
            self._logs = podman("logs", self._cid, check=False)
            return int(code)
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(timeout=120)
        finally:
            self._log.close()

    def log(self) -> str:
        if self._cid is not None:
            return self._logs.stdout + self._logs.stderr
        return self.log_path.read_text(errors="replace")

    def remove(self) -> None:
        if self._cid is not None:
            podman("rm", "-f", self._cid, check=False)
            return
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if getattr(self, "proc_mounted", False):
            subprocess.run(["umount", str(self.root / "proc")], check=False)
        with suppress(OSError):
            shutil.rmtree(self.root)  # 1.5 GB: not left for pytest's tmp rotation


def _values(args: list[str], option: str) -> Iterator[str]:
    for i, arg in enumerate(args[:-1]):
        if arg == option:
            yield args[i + 1]
