"""The playground's edit mode (``api/static/ui/edit.js``), in a real headless Chromium against a real server: an
image picked (the file chooser) or dropped, a mask painted over it with real pointer input (and erased), the
strength; what a job then carries (``image``, ``mask_image``: white = repaint, ``strength``); and an inpainting job
(then an image-to-image one) followed live to its image."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from browser import Browser, needs_chromium
from conftest import LiveServer, tiny_loader, wait_ready
from PIL import Image
from test_ui import IMAGES_LOADED, MESSAGE, RECORD, fill, job_id, open_page, screenshot, wait_state

from serverasync import Settings, create_app

pytestmark = needs_chromium
FIELDS = "window.PlaygroundEdit.fields()"
MODE = "document.getElementById('edit-mode').textContent"
SIZE = (96, 64)  # the picked image: width, height (multiples of 16, so the page edits it at its own size)


def _picture() -> Image.Image:
    """A smooth picture (a colour ramp), so its PNG round trip through a canvas is easy to recognise."""
    x = np.linspace(0, 255, SIZE[0])[None, :].repeat(SIZE[1], 0)
    y = np.linspace(0, 255, SIZE[1])[:, None].repeat(SIZE[0], 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2).astype(np.uint8))


def _decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,"), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)


def _pick(browser: Browser, path: Path) -> None:
    """Choose ``path`` in the page's file input, as the file chooser does (a change event follows)."""
    root = browser.send("DOM.getDocument")["root"]["nodeId"]
    node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#edit-file"})["nodeId"]
    browser.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})
    browser.wait_for("!document.getElementById('canvases').hidden", "the image to load")


def _drag(browser: Browser, points: list[tuple[float, float]]) -> None:
    """A real mouse stroke over the mask canvas, through ``points`` given as fractions of its width and height."""
    box = browser.evaluate(
        "(() => { const e = document.getElementById('edit-mask'); e.scrollIntoView({block: 'center'});"
        " const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
    )
    at = [(box[0] + fx * box[2], box[1] + fy * box[3]) for fx, fy in points]
    mouse = {"button": "left", "clickCount": 1}
    browser.send("Input.dispatchMouseEvent", {"type": "mousePressed", "x": at[0][0], "y": at[0][1], **mouse})
    for x, y in at[1:]:
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y, "buttons": 1, **mouse})
    browser.send("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": at[-1][0], "y": at[-1][1], **mouse})


def _line(y: float, x0: float, x1: float) -> list[tuple[float, float]]:
    return [(x0 + (x1 - x0) * i / 8, y) for i in range(9)]


@pytest.fixture(scope="module")
def server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for this module's tests."""
    images, data = (str(tmp_path_factory.mktemp(name)) for name in ("edit-images", "edit-data"))
    settings = Settings(model="random:tiny", image_dir=images, data_dir=data)
    live = LiveServer(create_app(settings, loader=tiny_loader(tiny_pipeline)))
    wait_ready(live.url)
    yield live
    live.stop()


def test_pick_paint_erase_and_what_a_job_carries(server: Any, tmp_path: Path) -> None:
    path = tmp_path / "picture.png"
    _picture().save(path)
    with Browser(tmp_path) as browser:
        open_page(browser, server.url)
        assert browser.evaluate(FIELDS) == {}  # no image: a text-to-image job, as before
        _pick(browser, path)
        assert browser.evaluate("[width.value, height.value]") == [str(SIZE[0]), str(SIZE[1])]  # its own size
        assert browser.evaluate(MODE) == "image-to-image"
        fields = browser.evaluate(FIELDS)
        assert set(fields) == {"image"}  # nothing painted: no mask, the whole image is redone
        image = _decode(fields["image"])
        assert image.shape == (SIZE[1], SIZE[0], 3)
        assert np.abs(image - np.asarray(_picture(), dtype=np.int16)).max() <= 2  # the picture itself

        _drag(browser, _line(0.5, 0.1, 0.9))  # a horizontal stroke across the middle
        assert browser.evaluate(MODE) == "inpainting"
        mask = _decode(browser.evaluate(FIELDS)["mask_image"])
        assert mask.shape == image.shape
        assert (mask[:, :, 0] == mask[:, :, 2]).all()  # grey levels only: white, black and the stroke's soft edge
        middle = SIZE[1] // 2
        assert (mask[middle, 15:80] == 255).all()  # the stroke: white, to repaint
        assert (mask[:8] == 0).all() and (mask[-8:] == 0).all()  # above and below it: black, kept
        assert (mask[:, :4] == 0).all()  # left of where it started

        browser.click("#tool-erase")
        _drag(browser, _line(0.5, 0.05, 0.5))  # erase the stroke's left half
        mask = _decode(browser.evaluate(FIELDS)["mask_image"])
        assert (mask[middle, 5:40] == 0).all() and (mask[middle, 60:80] == 255).all()

        browser.type("#strength", "0.7")
        assert browser.evaluate(FIELDS)["strength"] == 0.7
        browser.type("#mask-blur", "4")
        assert browser.evaluate(FIELDS)["mask_blur"] == 4
        screenshot(browser, tmp_path, "ui-edit.png")
        browser.click("#clear-mask")
        assert browser.evaluate(MODE) == "image-to-image"
        assert not {"mask_image", "mask_blur"} & set(browser.evaluate(FIELDS))  # a feather goes with a mask only
        browser.click("#remove-image")
        assert browser.evaluate(FIELDS) == {}
        assert browser.errors == []


def test_a_dropped_image_is_edited_at_a_size_the_model_takes(server: Any, tmp_path: Path) -> None:
    """Dropped (a drop event carrying the file, as a drag from the desktop delivers it): 200x120 is edited at the
    nearest multiples of 16."""
    buffer = io.BytesIO()
    Image.new("RGB", (200, 120), (200, 40, 40)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    with Browser(tmp_path) as browser:
        open_page(browser, server.url)
        browser.evaluate(
            "(() => { const bytes = Uint8Array.from(atob(" + json.dumps(data) + "), (c) => c.charCodeAt(0));"
            " const transfer = new DataTransfer();"
            " transfer.items.add(new File([bytes], 'red.png', {type: 'image/png'}));"
            " document.getElementById('drop').dispatchEvent("
            "   new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true})); })()"
        )
        browser.wait_for("!document.getElementById('canvases').hidden", "the dropped image")
        assert browser.evaluate("[width.value, height.value]") == ["208", "128"]
        assert _decode(browser.evaluate(FIELDS)["image"]).shape == (128, 208, 3)
        assert "red.png: 200×120, edited at 208×128." in browser.evaluate("document.body.innerText")
        assert browser.errors == []


def test_an_inpainting_job_is_followed_live_to_its_image(server: Any, tmp_path: Path) -> None:
    """Painted, then Generate: an inpainting job (the server says so) at the picture's size, its steps shown as they
    run, its image in the gallery; then, the paint cleared, an image-to-image job of the same picture."""
    path = tmp_path / "picture.png"
    _picture().save(path)
    with Browser(tmp_path) as browser:
        open_page(browser, server.url)
        browser.evaluate(RECORD)
        _pick(browser, path)
        _drag(browser, _line(0.5, 0.2, 0.8))
        fill(browser, prompt="a red boat", steps=6, seed=5, strength=0.7, **{"mask-blur": 3})
        browser.click("#generate")
        assert wait_state(browser, "succeeded") == "Done: 1 image, seed 5."
        # Live progress, counted in the steps strength 0.7 of 6 really runs (5: the pipeline's own cut).
        steps = {m.group(1) for t in browser.evaluate("window.seen.texts") if (m := re.match(r"Step (\d+) of 5", t))}
        assert len(steps) >= 2, browser.evaluate("window.seen.texts")
        [(src, width, height)] = browser.wait_for(IMAGES_LOADED, "the image to load")
        job = httpx.get(f"{server.url}/api/jobs/{job_id(browser)}", timeout=30).json()
        assert src == job["result"]["response"][0] and (width, height) == SIZE
        parameters = job["result"]["parameters"]
        assert (parameters["task"], parameters["strength"], parameters["mask_blur"]) == ("inpainting", 0.7, 3)
        assert (parameters["width"], parameters["height"]) == SIZE

        browser.click("#clear-mask")
        browser.click("#generate")
        wait_state(browser, "succeeded")
        job = httpx.get(f"{server.url}/api/jobs/{job_id(browser)}", timeout=30).json()
        assert job["result"]["parameters"]["task"] == "image-to-image"
        assert not browser.evaluate(MESSAGE) and browser.errors == []
        screenshot(browser, tmp_path, "ui-edit-done.png")
