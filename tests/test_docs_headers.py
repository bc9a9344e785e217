"""The docs' security headers (api/docs_headers.py): /docs, its assets and /openapi.json are held to /ui's rules
(no framing, no sniffing, only this server's script), and Swagger UI still works under them in a real Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from browser import Browser, needs_chromium
from conftest import LiveServer, tiny_loader, wait_ready

from serverasync import Settings, create_app

HEALTH_OPERATION = "#operations-default-health_health_get"


@pytest.fixture(scope="module")
def docs_server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for this module's tests (they only read); with a key, which the docs must not need."""
    image_dir = tmp_path_factory.mktemp("docs-images")
    data_dir = str(tmp_path_factory.mktemp("docs-data"))
    settings = Settings(model="random:tiny", image_dir=str(image_dir), data_dir=data_dir, api_key="sesame")
    live = LiveServer(create_app(settings, loader=tiny_loader(tiny_pipeline)))
    wait_ready(live.url)
    yield live
    live.stop()


@pytest.mark.parametrize("path", ["/docs", "/docs/oauth2-redirect"])
def test_the_docs_pages_cannot_be_framed_or_run_foreign_script(docs_server: LiveServer, path: str) -> None:
    for method in ("GET", "HEAD"):
        page = httpx.request(method, docs_server.url + path, timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy, policy
        script = next(part for part in policy.split(";") if part.strip().startswith("script-src"))
        # Its own files and its inline script by hash: never 'unsafe-inline', never another host.
        assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy and "http" not in policy, policy
        assert script.split()[1] == "'self'" and all(s.startswith("'sha256-") for s in script.split()[2:]), script
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("path", ["/openapi.json", "/docs/static/swagger-ui.css", "/docs/static/swagger-ui-bundle.js"])
def test_the_docs_files_are_never_sniffed_or_framed(docs_server: LiveServer, path: str) -> None:
    answer = httpx.get(docs_server.url + path, timeout=30)
    assert answer.status_code == 200
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]


@needs_chromium
def test_swagger_ui_works_under_its_policy(docs_server: LiveServer, tmp_path: Any) -> None:
    with Browser(tmp_path) as browser:
        browser.goto(docs_server.url + "/docs")
        browser.wait_for("document.querySelectorAll('.opblock').length >= 10", "Swagger UI to render the operations")
        # "Try it out" on GET /health: Swagger UI calls this server from the page (connect-src 'self').
        browser.click(f"{HEALTH_OPERATION} .opblock-summary")
        browser.wait_for("!!document.querySelector('.try-out__btn')", "the Try it out button")
        browser.click(".try-out__btn")
        browser.wait_for("!!document.querySelector('.execute')", "the Execute button")
        browser.click(".execute")
        status = "document.querySelector('.live-responses-table .response .response-col_status')"
        assert browser.wait_for(f"{status} && {status}.textContent.trim()", "the answer to show") == "200"
        assert ("GET", docs_server.url + "/health") in browser.requests
    # Everything came from this server (or data: icons), nothing was refused by the policy, nothing threw.
    assert all(url.startswith((docs_server.url + "/", "data:")) for _, url in browser.requests), browser.requests
    assert not [line for line in browser.log if "Content Security Policy" in line], browser.log
    assert browser.errors == []
