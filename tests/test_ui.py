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
from browser import Browser, keep_artifact, needs_chromium

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
        assert sorted(assets) == [
            "/ui/static/adapters.js",
            "/ui/static/edit.js",
            "/ui/static/ui.css",
            "/ui/static/ui.js",
        ]
        types = {path: client.get(path) for path in assets}
        assert types["/ui/static/ui.js"].headers["content-type"].startswith("text/javascript")
        assert types["/ui/static/edit.js"].headers["content-type"].startswith("text/javascript")
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
    server = make_server(default_steps=12, max_steps=40, max_images_per_request=3, max_image_size=512, api_key=KEY)
    limits = httpx.get(server.url + "/api/status", timeout=30, headers=AUTH).json()["limits"]
    # The same without the key at /ui/limits, so the form is usable before a key is typed.
    public = httpx.get(server.url + "/ui/limits", timeout=30)
    assert public.status_code == 200 and public.json() == limits
    assert httpx.get(server.url + "/api/status", timeout=30).status_code == 401  # the status itself stays guarded
    assert limits == {
        "default_size": 64,  # random:tiny's native size
        "size_multiple": 16,
        "max_size": 512,
        "default_steps": 12,
        "max_steps": 40,
        "max_images_per_request": 3,
        "max_prompt_chars": 2000,
    }


# ---------------------------------------------------------------------------------------------------------
# In a real headless Chromium, against a real server. The page's state is read from what it shows.
# ---------------------------------------------------------------------------------------------------------

# Records every text the job line showed and every value the progress bar took (mutation records keep each one,
# however quickly they follow each other), and how many previews appeared.
RECORD = """(() => {
  window.seen = {texts: [], values: [], previews: 0};
  new MutationObserver((records) => { for (const r of records) seen.values.push(r.oldValue); })
    .observe(document.getElementById('progress'), {attributeFilter: ['value'], attributeOldValue: true});
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) seen.texts.push(n.textContent);
  }).observe(document.getElementById('job-text'), {childList: true});
  new MutationObserver(() => {
    seen.previews = Math.max(seen.previews, document.querySelectorAll('#previews img[src^="data:image/png"]').length);
  }).observe(document.getElementById('previews'), {childList: true, subtree: true, attributes: true});
})()"""
STATE = "document.getElementById('job').dataset.state"
TEXT = "document.getElementById('job-text').textContent"
MESSAGE = "(document.getElementById('message').hidden ? '' : document.getElementById('message').textContent)"
IMAGES_LOADED = """(() => { const imgs = [...document.querySelectorAll('#gallery img')];
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0)
    && imgs.map((i) => [i.src, i.naturalWidth, i.naturalHeight]); })()"""
CAPTIONS = "[...document.querySelectorAll('#gallery figcaption .seed')].map((e) => e.textContent)"


def open_page(browser: Browser, url: str) -> None:
    browser.goto(url + "/ui")
    browser.wait_for("document.getElementById('server-info').textContent.includes('·') || !!" + MESSAGE, "status")


def fill(browser: Browser, **fields: Any) -> None:
    """Type into the form's fields, by their element ids."""
    if "preview-every" in fields:
        browser.evaluate("document.getElementById('more').open = true")
    for name, value in fields.items():
        browser.type(f"#{name}", str(value))


def wait_state(browser: Browser, state: str) -> str:
    """Wait until the job line is in ``state``; its text."""
    browser.wait_for(f"{STATE} === {state!r}", f"the job to be {state}", timeout=120)
    return browser.evaluate(TEXT)


def job_id(browser: Browser, method: str = "GET") -> str:
    """The id of the last job the page followed (GET, its events) or cancelled (DELETE), from its requests."""
    ids = [re.search(r"/api/jobs/([^/]+)", url) for m, url in browser.requests if m == method and "/api/jobs/" in url]
    return [found.group(1) for found in ids if found][-1]


def screenshot(browser: Browser, tmp_path: Path, name: str) -> Path:
    kept = keep_artifact(browser.screenshot(tmp_path / name))
    print(f"screenshot: {tmp_path / name} (kept as {kept})")  # where to look at it (pytest -s shows it)
    return kept


@needs_chromium
@pytest.mark.parametrize("engine", ["threads", "step"])
def test_a_generation_is_followed_live_to_its_images(
    make_server: Callable[..., Any], tmp_path: Path, engine: str
) -> None:
    server = make_server(engine=engine)
    with Browser(tmp_path) as browser:
        open_page(browser, server.url)
        assert browser.evaluate("document.getElementById('width').value") == "64"  # the model's size, from status
        browser.evaluate(RECORD)
        fill(browser, prompt="a lighthouse at dusk", width=256, height=256, steps=12, count=2, seed=1234)
        fill(browser, **{"preview-every": 2})
        browser.click("#generate")
        assert wait_state(browser, "succeeded") == "Done: 2 images, seed 1234."

        seen = browser.evaluate("window.seen")
        steps = {int(m.group(1)) for t in seen["texts"] if (m := re.match(r"Step (\d+) of 12", t))}
        values = {float(v) for v in seen["values"] if v is not None}  # each value the bar had before a change
        assert len(steps) >= 2 and len(values & set(range(1, 12))) >= 2, seen  # the bar advanced, step by step
        assert seen["previews"] == 2, seen  # one preview per image, shown while it ran
        assert browser.evaluate("document.getElementById('previews').hidden")  # and put away at the end

        loaded = browser.wait_for(IMAGES_LOADED, "the images to load")
        job = httpx.get(f"{server.url}/api/jobs/{job_id(browser)}", timeout=30).json()
        assert [src for src, *_ in loaded] == job["result"]["response"]  # the job's own images, really loaded
        assert all(size == [256, 256] for _, *size in loaded)
        assert browser.evaluate(CAPTIONS) == ["seed 1234", "seed 1234"]
        assert browser.evaluate("document.querySelector('#gallery a').target") == "_blank"  # opens the full image

        # A second run lands first: newest first.
        fill(browser, steps=2, count=1, seed=99)
        browser.click("#generate")
        wait_state(browser, "succeeded")
        assert browser.evaluate(CAPTIONS) == ["seed 99", "seed 1234", "seed 1234"]
        browser.wait_for(IMAGES_LOADED, "the images to load")

        # Nothing but this server was asked for anything (no CDN, no font), and the script threw nothing.
        assert all(url.startswith((server.url + "/", "data:")) for _, url in browser.requests), browser.requests
        assert browser.errors == []
        assert not [line for line in browser.log if "Content Security Policy" in line], browser.log
        suffix = "" if engine == "threads" else f"-{engine}"
        screenshot(browser, tmp_path, f"ui{suffix}.png")
        browser.set_viewport(380, 800)  # a phone: one column, nothing wider than the screen
        assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        screenshot(browser, tmp_path, f"ui-narrow{suffix}.png")


@needs_chromium
def test_the_page_asks_for_the_key_and_works_with_it(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server(api_key=KEY)
    with Browser(tmp_path) as browser:
        open_page(browser, server.url)  # the page itself needs no key
        assert "needs an API key" in browser.wait_for(MESSAGE, "the key message")
        # The form is filled all the same (its defaults and limits need no key): the model's size, the steps.
        values = "['width', 'height', 'steps'].map((id) => document.getElementById(id).value)"
        assert browser.evaluate(values) == ["64", "64", "28"]
        assert browser.evaluate("document.getElementById('server-info').textContent") == "API key needed"
        fill(browser, prompt="a red fox", steps=2)
        browser.click("#generate")
        browser.wait_for(f"{STATE} === 'failed'", "the refusal")
        assert "needs an API key" in browser.evaluate(MESSAGE)
        assert browser.evaluate("document.getElementById('message').classList.contains('error')")
        assert browser.evaluate("document.activeElement.id") == "api-key"

        fill(browser, **{"api-key": "wrong"})
        browser.click("#generate")
        browser.wait_for(f"{STATE} === 'failed'", "the refusal")
        assert "needs an API key" in browser.evaluate(MESSAGE)

        # Set as a password manager fills a field: no change event. The first call that goes through with it puts
        # the server's name in the header, in place of "API key needed".
        browser.evaluate(f"document.getElementById('api-key').value = {KEY!r}")
        browser.click("#remember")
        browser.click("#generate")
        wait_state(browser, "succeeded")
        assert not browser.evaluate(MESSAGE)
        browser.wait_for("document.getElementById('server-info').textContent.includes('random:tiny')", "the header")
        browser.wait_for(IMAGES_LOADED, "the image to load")  # an image URL is its own credential: no key needed

        # Remembered on this device: a reload fills the key in, and the server's status loads with it.
        open_page(browser, server.url)
        assert browser.evaluate("document.getElementById('api-key').value") == KEY
        browser.wait_for("document.getElementById('server-info').textContent.includes('random:tiny')", "status")
        assert not browser.evaluate(MESSAGE)
        assert browser.errors == []


@needs_chromium
def test_cancel_while_queued_and_while_running_and_a_busy_server(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = make_server(max_concurrency=1, max_queue=1, max_steps=1000)
    long_job = {"prompt": "a long job", "num_inference_steps": 1000, "width": 256, "height": 256}
    with httpx.Client(base_url=server.url, timeout=60) as client, Browser(tmp_path) as browser:
        open_page(browser, server.url)
        fill(browser, prompt="a long walk", steps=1000, width=256, height=256)
        fill(browser, **{"preview-every": 5})
        blocker = client.post("/api/jobs", json=long_job).json()["id"]  # takes the one slot
        queued = client.post("/api/jobs", json=long_job).json()["id"]  # and fills the queue
        try:
            browser.click("#generate")
            browser.wait_for(f"{STATE} === 'failed'", "the overload answer")
            assert re.search(r"server is busy: .* Try again in \d+ s\.", browser.evaluate(MESSAGE))

            client.delete(f"/api/jobs/{queued}")
            browser.click("#generate")
            assert wait_state(browser, "queued") == "Queued: next in line."
            assert not browser.evaluate("document.getElementById('cancel').disabled")
            browser.click("#cancel")
            assert wait_state(browser, "cancelled") == "Cancelled before it started."
            assert client.get(f"/api/jobs/{job_id(browser, 'DELETE')}").json()["status"] == "cancelled"

            browser.click("#generate")
            wait_state(browser, "queued")
            client.delete(f"/api/jobs/{blocker}")  # the page's job gets the slot
            browser.wait_for("!!document.querySelector('#previews:not([hidden]) img')", "a preview", timeout=120)
            assert re.fullmatch(r"Step \d+ of 1000 · about \d+ s left", browser.evaluate(TEXT))
            screenshot(browser, tmp_path, "ui-running.png")
            browser.click("#cancel")
            text = wait_state(browser, "cancelled")
            assert re.fullmatch(r"Cancelled at step \d+ of 1000\.", text), text
            job = client.get(f"/api/jobs/{job_id(browser, 'DELETE')}").json()
            assert job["status"] == "cancelled" and 1 <= job["step"] < 1000
            assert browser.evaluate("document.getElementById('generate').disabled") is False
            screenshot(browser, tmp_path, "ui-cancelled.png")
        finally:
            for leftover in (blocker, queued):
                client.delete(f"/api/jobs/{leftover}")


@needs_chromium
def test_a_refused_request_and_a_failed_job_are_shown(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server(max_prompt_chars=20, request_timeout=1, max_steps=1000)
    with Browser(tmp_path) as browser:
        open_page(browser, server.url)
        # Typing stops at the limit the page read from the server; a value set by script does not, so the server's
        # own 400 is what the page shows.
        browser.evaluate("document.getElementById('prompt').value = 'a very long prompt indeed, past the limit'")
        browser.click("#generate")
        browser.wait_for(f"{STATE} === 'failed'", "the 400")
        assert browser.evaluate(MESSAGE) == "Please check the form: prompt: at most 20 characters; shorten the prompt"

        fill(browser, prompt="a long walk", steps=1000, width=256, height=256)
        browser.click("#generate")
        assert wait_state(browser, "failed") == "Failed."  # the server's --request-timeout stopped it
        assert browser.evaluate(MESSAGE) == "The generation failed: The request took longer than 1s and was stopped."
        assert browser.evaluate("document.getElementById('message').classList.contains('error')")
        assert browser.evaluate("document.getElementById('generate').disabled") is False
        assert browser.errors == []
