"""Debian's headless Chromium for tests: one-shot runs (``--dump-dom``, ``--screenshot``) and, for pages a test
interacts with, a small DevTools-protocol client over Chromium's remote-debugging websocket (the ``websockets``
package comes with ``uvicorn[standard]``; no browser download, no playwright).

Every browser started here resolves no host name but 127.0.0.1, so a page that needs a CDN or a web font shows it.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ARTIFACTS", "CHROMIUM", "Browser", "keep_artifact", "needs_chromium", "run_chromium"]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored: screenshots kept after a run
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"
)


def _fresh_profile(tmp_path: Path) -> Path:
    return tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once, with a fresh profile and nothing that reaches beyond loopback."""
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={_fresh_profile(tmp_path)}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def keep_artifact(path: Path) -> Path:
    """Copy a test's file (a screenshot) to tests/artifacts/, so it outlives pytest's tmp dirs; returns the copy."""
    ARTIFACTS.mkdir(exist_ok=True)
    return Path(shutil.copyfile(path, ARTIFACTS / path.name))


class BrowserError(RuntimeError):
    """The DevTools protocol answered an error, or the page's script threw."""


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol. Use as a context manager.

    It records what the page did, for assertions: ``requests`` (every URL it fetched), ``errors`` (uncaught
    exceptions and ``console.error`` lines) and ``log`` (the browser's own messages: failed loads, refusals by the
    page's Content-Security-Policy, ...).
    """

    def __init__(self, tmp_path: Path, width: int = 1200, height: int = 900, timeout: float = 60.0) -> None:
        self.profile = _fresh_profile(tmp_path)
        self.size = (width, height)
        self.timeout = timeout
        self.requests: list[tuple[str, str]] = []  # (method, url)
        self.errors: list[str] = []
        self.log: list[str] = []
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._session = ""

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect

        command = [str(CHROMIUM), *FLAGS, OFFLINE, f"--user-data-dir={self.profile}", "--remote-debugging-port=0"]
        self._proc = subprocess.Popen([*command, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port, path = self._debugging_address()
            self._ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=self.timeout)
            page = next(t for t in self.send("Target.getTargets", session=False)["targetInfos"] if t["type"] == "page")
            attached = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}, False)
            self._session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                self.send(f"{domain}.enable")
            self.set_viewport(*self.size)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=15)

    def _debugging_address(self) -> tuple[str, str]:
        # Chromium writes the port it picked and the browser's websocket path into the profile once it listens.
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            assert self._proc is not None and self._proc.poll() is None, "chromium exited at start"
            lines = active.read_text().split("\n") if active.exists() else []
            if len(lines) >= 2 and lines[0].isdigit() and lines[1]:
                return lines[0], lines[1]
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its debugging port")

    # ---- the protocol -------------------------------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one command and wait for its answer; events that arrive meanwhile are recorded."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while True:
            answer = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if answer.get("id") == message["id"]:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self._record(answer)

    def _record(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append((params["request"]["method"], params["request"]["url"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded":
            self.log.append(f"{params['entry']['level']}: {params['entry']['text']}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))

    # ---- what tests do ------------------------------------------------------------------------------------------

    def goto(self, url: str) -> None:
        """Open ``url`` and wait until it has loaded."""
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", "the page to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return answer["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value. On timeout, fail with what the page shows."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        shown = self.evaluate("document.body ? document.body.innerText : ''")
        raise AssertionError(f"timed out waiting for {what}; page errors: {self.errors}; the page shows:\n{shown}")

    def set_viewport(self, width: int, height: int) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) in the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            )

    def type(self, selector: str, text: str, replace: bool = True) -> None:
        """Focus the element and type ``text`` as keyboard input would (input events); then leave it (change)."""
        sel = json.dumps(selector)
        select = "e.select();" if replace else ""
        self.evaluate(f"(() => {{ const e = document.querySelector({sel}); e.focus(); {select} }})()")
        self.send("Input.insertText", {"text": text})
        self.evaluate(f"document.querySelector({sel}).blur()")

    def screenshot(self, path: Path) -> Path:
        """The whole page (beyond the viewport too) as a PNG at ``path``."""
        import base64

        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
