"""The playground page (``GET /ui``): served from the package with no outside resources, public like /docs; and, in
a real headless Chromium against a real server, a generation followed live to its image, the API key flow, cancel
and the errors the page shows."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

KEY = "open-sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_the_page_and_its_files_are_served_from_the_package_whatever_the_cwd(
    make_server: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the files are found next to the package, not in the working directory
    server = make_server(api_key=KEY)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        page = client.get("/ui")  # no key: the page is public, like /docs
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        assets = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text)
        assert sorted(assets) == ["/ui/static/ui.css", "/ui/static/ui.js"]
        types = {path: client.get(path) for path in assets}
        assert types["/ui/static/ui.js"].headers["content-type"].startswith("text/javascript")
        assert types["/ui/static/ui.css"].headers["content-type"].startswith("text/css")
        for text in [page.text, *(answer.text for answer in types.values())]:
            # Nothing from another host: no CDN, no web font; the page works offline.
            assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", text, re.IGNORECASE)
            assert "new EventSource" not in text  # it cannot send the key: the stream is read with fetch()

        for path in ("/ui/static/index.html", "/ui/static/..%2Froutes%2Fui.py", "/ui/static/nope.js"):
            missing = client.get(path)
            assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error", path
        assert client.get("/").json()["playground"] == "/ui"
        assert client.post("/api/jobs", json={"prompt": "x"}).status_code == 401  # what the page calls needs the key
        assert "/ui" not in client.get("/openapi.json").text  # a page, not an API operation


def test_status_tells_the_page_the_defaults_and_limits(make_server: Callable[..., Any]) -> None:
    server = make_server(default_steps=12, max_steps=40, max_images_per_request=3, max_image_size=512)
    limits = httpx.get(server.url + "/api/status", timeout=30).json()["limits"]
    assert limits == {
        "default_size": 64,  # random:tiny's native size
        "size_multiple": 16,
        "max_size": 512,
        "default_steps": 12,
        "max_steps": 40,
        "max_images_per_request": 3,
        "max_prompt_chars": 2000,
    }
