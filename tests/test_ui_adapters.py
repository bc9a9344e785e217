"""The playground's LoRA adapters (``api/static/ui/adapters.js``) in a real headless Chromium against a real server
with adapters: the list the server offers, a ticked adapter with its scale carried by the job and used by the
server; a server without adapters shows no such section."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import Browser, needs_chromium
from conftest import LiveServer, tiny_loader, wait_ready
from lora_helpers import fresh_tiny, make_adapter
from test_ui import IMAGES_LOADED, MESSAGE, fill, job_id, open_page, screenshot, wait_state

from serverasync import Settings, create_app

pytestmark = needs_chromium
NAMES = "[...document.querySelectorAll('#adapter-list input[data-adapter]')].map((e) => e.dataset.adapter)"
FIELDS = "window.PlaygroundAdapters.fields()"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("ui-loras")
    loras = [f"ink={make_adapter(root / 'ink', seed=1)}", f"neon={make_adapter(root / 'neon', seed=2)}"]
    settings = Settings(model="random:tiny", image_dir=str(root / "images"), data_dir=str(root), lora=loras)
    live = LiveServer(create_app(settings, loader=tiny_loader(fresh_tiny())))
    wait_ready(live.url)
    yield live
    live.stop()


def test_the_page_offers_the_adapters_and_a_job_uses_the_ticked_one(server: LiveServer, tmp_path: Path) -> None:
    with Browser(tmp_path) as browser:
        open_page(browser, server.url)
        browser.wait_for(f"{NAMES}.length === 2", "the adapters to be listed")
        assert browser.evaluate(NAMES) == ["ink", "neon"]
        assert browser.evaluate("document.getElementById('adapters').hidden") is False
        assert browser.evaluate(FIELDS) == {}  # nothing ticked: the base model
        browser.evaluate("document.getElementById('adapters').open = true")
        browser.click('#adapter-list input[data-adapter="neon"]')
        browser.type('#adapter-list input[data-scale="neon"]', "0.5")
        assert browser.evaluate(FIELDS) == {"loras": [{"name": "neon", "scale": 0.5}]}
        fill(browser, prompt="a lighthouse", steps=3, seed=9, width=32, height=32)
        browser.click("#generate")
        assert wait_state(browser, "succeeded") == "Done: 1 image, seed 9."
        browser.wait_for(IMAGES_LOADED, "the image to load")
        job = httpx.get(f"{server.url}/api/jobs/{job_id(browser)}", timeout=30).json()
        assert job["result"]["parameters"]["loras"] == [{"name": "neon", "scale": 0.5}]
        assert not browser.evaluate(MESSAGE) and browser.errors == []
        screenshot(browser, tmp_path, "ui-adapters.png")


def test_a_server_without_adapters_shows_no_adapter_section(make_server: Any, tmp_path: Path) -> None:
    live = make_server()
    with Browser(tmp_path) as browser:
        open_page(browser, live.url)
        assert browser.evaluate("document.getElementById('adapters').hidden") is True
        assert browser.evaluate(FIELDS) == {} and browser.errors == []
