"""A real browser (Debian's headless Chromium) opens the image URLs the server hands out."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from browser import OFFLINE, needs_chromium, run_chromium
from http_helpers import NATIVE, fetch_png
from PIL import Image

WINDOW = (320, 240)
IMAGE = (128, 96)  # width, height: smaller than the window, so Chromium centres it on its dark background
BACKGROUND = np.array([14, 14, 14])  # Chromium's backdrop for a lone image (rgb(14, 14, 14))

pytestmark = needs_chromium


def test_chromium_shows_the_generated_image(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server()
    body = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 7, "width": IMAGE[0], "height": IMAGE[1]}
    answer = httpx.post(server.url + NATIVE, json=body, timeout=120).json()
    [url] = answer["response"]
    served = np.asarray(Image.open(io.BytesIO(fetch_png(url))).convert("RGB"), dtype=np.int16)

    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", url)
    screen = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert screen.shape == (WINDOW[1], WINDOW[0], 3)

    # Where the page is not background is exactly where the image is: its size, centred.
    painted = np.abs(screen - BACKGROUND).sum(axis=2) > 6
    rows, cols = np.nonzero(painted)
    assert rows.size, "the screenshot is blank background: the image was not shown"
    left, top = (WINDOW[0] - IMAGE[0]) // 2, (WINDOW[1] - IMAGE[1]) // 2
    box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    # The image's own pixels may happen to match the background at its edges, so allow a few pixels of slack.
    assert abs(box[0] - left) <= 3 and abs(box[1] - top) <= 3, box
    assert abs(box[2] - (left + IMAGE[0])) <= 3 and abs(box[3] - (top + IMAGE[1])) <= 3, box

    # And what is shown there is the served PNG (allowing for colour management).
    shown = screen[top : top + IMAGE[1], left : left + IMAGE[0]]
    assert np.abs(shown - served).mean() < 3.0
    assert served.std() > 5  # the comparison means something: the image is not flat


def test_chromium_decodes_the_image_and_gets_a_404_envelope_for_unknown_names(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = make_server()
    body = {"prompt": "a lighthouse", "num_inference_steps": 2, "width": IMAGE[0], "height": IMAGE[1]}
    [url] = httpx.post(server.url + NATIVE, json=body, timeout=120).json()["response"]
    name = url.rsplit("/", 1)[1]

    dom = run_chromium(tmp_path, "--dump-dom", url).stdout
    # Chromium titles an image document "<name> (<width>×<height>)" once it has decoded it.
    assert f"{name} ({IMAGE[0]}×{IMAGE[1]})" in dom
    assert '<img style="' in dom and f'src="{url}"' in dom

    missing = run_chromium(tmp_path, "--dump-dom", f"{server.url}/images/{'0' * 32}.png").stdout
    assert "No such image." in missing and "image_not_found" in missing
    assert "<img" not in missing


def test_docs_render_every_operation_with_no_network(make_server: Callable[..., Any], tmp_path: Path) -> None:
    server = make_server()
    # Every host name but loopback fails to resolve: a page that needs a CDN renders nothing here.
    dom = run_chromium(tmp_path, OFFLINE, "--virtual-time-budget=20000", "--dump-dom", f"{server.url}/docs").stdout
    # Swagger UI built its page from /openapi.json: one block per operation, each with its path.
    for path in ("/api/diffusers/inference", "/v1/images/generations", "/v1/models", "/health"):
        assert f'data-path="{path}"' in dom, f"{path} missing from the rendered /docs"
    assert "cdn.jsdelivr.net" not in dom and "fonts.googleapis.com" not in dom
    assert httpx.get(server.url + "/redoc").status_code == 404  # dropped: one set of docs, served locally
