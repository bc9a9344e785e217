"""A real nginx for tests: its configuration rendered from deploy/nginx/sd3.conf.template, in a temporary prefix.

Where nginx is missing: a failure where it could have been installed (apt-get, as root: .ci/run installs Debian's
package there), a skip saying why only where it cannot (no apt-get, or not root), as for Chromium.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from api.settings import Settings
from deploy.nginx_config import render

START_TIMEOUT = 20.0


def nginx_binary() -> str:
    """The nginx to run, or fail/skip as the module's notes say."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("nginx is not installed, and apt-get (as root) is not available here to install it")
    pytest.fail("nginx is not installed: apt-get install nginx (.ci/run does, in CI)")


class NginxProcess:
    """``nginx -g 'daemon off;'`` on a free loopback port in front of ``upstream`` (host:port), with ``limits``."""

    def __init__(self, prefix: Path, upstream: str, **limits: Any) -> None:
        binary = nginx_binary()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(**limits)
        for folder in ("logs", "temp"):
            (prefix / folder).mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(render(self.settings, f"127.0.0.1:{self.port}", [upstream]))
        self.prefix = prefix
        self.log_path = prefix / "nginx.out"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [binary, "-p", str(prefix), "-c", str(self.conf), "-e", "stderr", "-g", "daemon off;"]
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        error_log = self.prefix / "logs" / "error.log"
        return text + (error_log.read_text(errors="replace") if error_log.exists() else "")

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"nginx exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"nginx not listening after {START_TIMEOUT:g}s:\n{self.log()[-3000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: the master stops its workers), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()
