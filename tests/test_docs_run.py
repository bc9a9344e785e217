"""Every documented command works: the README's and the site's commands and snippets, run against a real server.

One server for the module, started as the LoRA page starts it (``python serverasync.py --model random:tiny --lora
... --lora-dir ...``, parsed by the server's own CLI parser) on adapters made by the page's ``make_lora.py`` lines, so
every example finds what it names. Then, with ``http://localhost:8500`` replaced by that server's URL and every
``num_inference_steps`` cut to two: each ``curl`` command answers 2xx, with the keys of the JSON answer the page
shows beside it; each Python snippet (the ``openai`` client, httpx, the request-scoped view) runs; each
``python test.py`` command exits 0; each ``python serverasync.py`` / ``./serve`` command line is valid options. The
two mask conventions are checked to repaint the same pixels, and the made adapters to change the image.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import LiveServer, wait_ready
from PIL import Image
from test_docs import REPO, code_blocks, everything, page

DOCUMENTED_URL = "http://localhost:8500"
JOB_PLACEHOLDER = "Qm9ZsL3tX1kqTg0b7cW4ew"  # the jobs page's example id
IMAGE_PLACEHOLDER = "3f2a...e1.png"  # the native page's example image name
SERVE_OWN = {"--venv": 1, "--torch": 1, "--python": 1, "--dry-run": 0}  # ./serve's options and their values


def fewer_steps(text: str) -> str:
    """``text`` with every step count the examples give cut to 2 (JSON, escaped JSON in a shell string, keyword
    arguments and form fields, test.py's flag): the examples' sizes are small already."""
    text = re.sub(r'(\\?"num_inference_steps\\?"\s*:\s*)\d+', r"\g<1>2", text)
    text = re.sub(r"(num_inference_steps\s*=\s*)\d+", r"\g<1>2", text)
    return re.sub(r"(--steps )\d+", r"\g<1>2", text)


def _lines(body: str) -> list[str]:
    """A shell block's commands: continuations joined, comment lines dropped, ``a && b`` as two commands."""
    joined = body.replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [part.strip() for line in lines for part in line.split(" && ")]


def _shell_blocks() -> list[tuple[str, int, str, tuple[str, str] | None]]:
    """(where, index, body, the code block after it) of every bash block of the README and the pages."""
    found = []
    for where, text in everything().items():
        blocks = code_blocks(text)
        for i, (lang, body) in enumerate(blocks):
            if lang == "bash":
                found.append((where, i, body, blocks[i + 1] if i + 1 < len(blocks) else None))
    return found


def _python_snippets() -> list[tuple[str, int, str]]:
    """Every Python block but the one the fixtures run (the masks)."""
    return [
        (where, i, body)
        for where, text in everything().items()
        for i, (lang, body) in enumerate(code_blocks(text))
        if lang == "python" and not _is_mask_snippet(body)
    ]


def _is_mask_snippet(body: str) -> bool:
    return "mask-white.png" in body and "ImageDraw" in body


CURL_BLOCKS = [
    (where, i, [line for line in _lines(body) if line.startswith("curl ")], after)
    for where, i, body, after in _shell_blocks()
    if any(line.startswith("curl ") for line in _lines(body))
]
CLIENT_RUNS = [
    (where, line) for where, _, body, _ in _shell_blocks() for line in _lines(body) if line.startswith("python test.py")
]
SERVER_LINES = [
    (where, line)
    for where, _, body, _ in _shell_blocks()
    for line in _lines(body)
    if line.startswith(("python serverasync.py", "./serve"))
]


def _environment() -> dict[str, str]:
    """This environment without an API key: the documented server has none."""
    return {k: v for k, v in os.environ.items() if k != "SERVER_API_KEY"}


# -- the server and the files the pages use ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the pages' files: photo.png (any picture), the masks the edits page's snippet makes from it,
    and the adapters the LoRA page's ``make_lora.py`` commands make (its own ``main``, in this process: each run as
    a subprocess would cost seconds of importing torch)."""
    root = tmp_path_factory.mktemp("docs")
    y, x = np.mgrid[0:64, 0:64]
    picture = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(picture).save(root / "photo.png")
    [masks] = [
        body for _, text in everything().items() for _, body in code_blocks(text, "python") if _is_mask_snippet(body)
    ]
    subprocess.run([sys.executable, "-c", masks], cwd=root, check=True, timeout=60)
    import make_lora

    runs = [
        line
        for _, body in code_blocks(page("features/lora.md"), "bash")
        for line in _lines(body)
        if line.startswith("python make_lora.py")
    ]
    assert len(runs) == 3, runs
    for line in runs:
        args = shlex.split(line)[2:]
        out = args.index("--out") + 1
        args[out] = str(root / args[out])
        assert make_lora.main(args) == 0, line
        written = Path(args[out])
        written = written if written.suffix == ".safetensors" else written / "pytorch_lora_weights.safetensors"
        assert written.is_file(), line
    return root


def _server_args(line: str, root: Path) -> list[str]:
    """A documented ``python serverasync.py`` (or ``./serve``) line's server options (``./serve``'s own left out),
    relative adapter paths under ``root``."""
    words = [word for word in shlex.split(line, comments=True) if word != "&"]
    serve = words[0] == "./serve"
    words = words[1:] if serve else words[2:]
    args: list[str] = []
    skip = 0
    for word in words:
        if skip:
            skip -= 1
        elif serve and word.split("=")[0] in SERVE_OWN:
            skip = 0 if "=" in word else SERVE_OWN[word]
        else:
            args.append(re.sub(r"(^|=)loras/", rf"\g<1>{root}/loras/", word))
    return args


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[LiveServer]:
    """The LoRA page's server command, parsed by the server's own parser, serving on a free loopback port."""
    from serverasync import create_app, parse_settings

    [line] = [line for where, line in SERVER_LINES if where == "docs/features/lora.md"]
    args = _server_args(line, workdir) + ["--image-dir", str(workdir / "images"), "--default-steps", "2"]
    args += ["--data-dir", str(workdir)]  # the default job store, jobs.db, there
    live = LiveServer(create_app(parse_settings(args)))
    try:
        wait_ready(live.url)
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def known(server: LiveServer) -> dict[str, str]:
    """Real values for the pages' placeholders: a job id and a stored image's name."""
    job = httpx.post(f"{server.url}/api/jobs", json={"prompt": "a lighthouse", "num_inference_steps": 2}, timeout=60)
    answer = httpx.post(f"{server.url}/api/diffusers/inference", json={"prompt": "a lighthouse"}, timeout=60)
    assert job.status_code == 202 and answer.status_code == 200, (job.text, answer.text)
    return {JOB_PLACEHOLDER: job.json()["id"], IMAGE_PLACEHOLDER: answer.json()["response"][0].rsplit("/", 1)[1]}


# -- the commands --------------------------------------------------------------------------------------------------


def _keys_within(documented: Any, actual: Any, where: str = "") -> None:
    """Every key the documented answer shows is in the real one, at every depth (lists: their first items)."""
    if isinstance(documented, dict):
        assert isinstance(actual, dict), (where, actual)
        assert set(documented) <= set(actual), (where, set(documented) - set(actual))
        for key, value in documented.items():
            _keys_within(value, actual[key], f"{where}.{key}")
    elif isinstance(documented, list) and documented and isinstance(actual, list) and actual:
        _keys_within(documented[0], actual[0], f"{where}[0]")


def _curl(command: str, url: str, known: dict[str, str], cwd: Path) -> str:
    """Run one documented curl command against ``url``; its output. Fails on an HTTP error (``--fail-with-body``)."""
    command = fewer_steps(command).replace(DOCUMENTED_URL, url).replace("localhost:8500", url.removeprefix("http://"))
    for placeholder, value in known.items():
        command = command.replace(placeholder, value)
    assert "..." not in command.replace("$(", ""), f"a placeholder this test does not know: {command}"
    command = "curl --fail-with-body" + command.removeprefix("curl")
    result = subprocess.run(
        ["bash", "-c", "set -o pipefail; " + command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(),
        check=False,
    )
    assert result.returncode == 0, (command[:400], result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout


@pytest.mark.parametrize(
    ("where", "commands", "after"),
    [(where, commands, after) for where, _, commands, after in CURL_BLOCKS],
    ids=[f"{where}:{i}" for where, i, _, _ in CURL_BLOCKS],
)
def test_the_documented_curl_commands_answer(
    where: str,
    commands: list[str],
    after: tuple[str, str] | None,
    server: LiveServer,
    known: dict[str, str],
    workdir: Path,
) -> None:
    outputs = [_curl(command, server.url, known, workdir) for command in commands]
    if after is not None and after[0] == "json":
        documented, actual = json.loads(after[1]), json.loads(outputs[-1])
        _keys_within(documented, actual)
        if where == "docs/api/native.md":  # the reference answer shows every field
            assert set(documented) == set(actual) and set(documented["parameters"]) == set(actual["parameters"])


def test_every_request_example_is_run() -> None:
    """The pages' requests are curl commands this module runs: as many as the APIs have examples."""
    commands = [command for _, _, block, _ in CURL_BLOCKS for command in block]
    assert len(commands) >= 25, commands
    for path in (
        "/api/diffusers/inference",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/api/jobs",
        "/api/status",
        "/metrics",
        "/health",
        "/ready",
        "/v1/models",
        "/images/",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
    ):
        assert any(path in command for command in commands), path


@pytest.mark.parametrize(
    ("where", "code"),
    [(where, code) for where, _, code in _python_snippets()],
    ids=[f"{where}:{i}" for where, i, _ in _python_snippets()],
)
def test_the_documented_python_snippets_run(
    where: str, code: str, server: LiveServer, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    code = fewer_steps(code).replace(DOCUMENTED_URL, server.url)
    exec(compile(code, where, "exec"), {"__name__": "__main__"})  # the page's snippet, as a user runs it


@pytest.mark.parametrize(("where", "line"), CLIENT_RUNS, ids=[f"{where}:{line[:40]}" for where, line in CLIENT_RUNS])
def test_the_documented_test_py_commands_succeed(where: str, line: str, server: LiveServer, workdir: Path) -> None:
    args = shlex.split(fewer_steps(line), comments=True)[2:]
    if "--url" in args:
        args[args.index("--url") + 1] = server.url
    else:
        args += ["--url", server.url]
    command = [sys.executable, str(REPO / "test.py"), *args, "--out", str(workdir / "out")]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=120, env=_environment())
    assert result.returncode == 0, (line, result.stdout[-2000:], result.stderr[-2000:])
    assert ".png" in result.stdout


@pytest.mark.parametrize(("where", "line"), SERVER_LINES, ids=[f"{where}:{line[:50]}" for where, line in SERVER_LINES])
def test_the_documented_server_command_lines_are_valid_options(
    where: str, line: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every option the pages start the server with exists and takes the value given (checked as the server checks
    its command line before loading), relative paths from the folder the pages' files are in."""
    from serverasync import parse_settings

    monkeypatch.chdir(workdir)
    monkeypatch.delenv("SERVER_API_KEY", raising=False)
    parse_settings(_server_args(line, workdir), environ={})


def test_server_command_lines_are_found() -> None:
    assert len(SERVER_LINES) >= 8 and len(CLIENT_RUNS) >= 8, (SERVER_LINES, CLIENT_RUNS)


# -- what the pages promise ----------------------------------------------------------------------------------------


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_the_masks_are_the_conventions_the_table_gives(workdir: Path) -> None:
    """mask-white.png: white inside the rectangle, black outside, no alpha; mask-alpha.png: transparent inside,
    opaque outside; the same rectangle."""
    white = np.asarray(Image.open(workdir / "mask-white.png"))
    alpha = Image.open(workdir / "mask-alpha.png")
    assert white.ndim == 2 and set(np.unique(white)) == {0, 255}
    assert alpha.mode == "RGBA" and set(np.unique(np.asarray(alpha)[..., 3])) == {0, 255}
    assert np.array_equal(white == 255, np.asarray(alpha)[..., 3] == 0)


def test_both_mask_conventions_repaint_the_same_pixels(server: LiveServer, workdir: Path) -> None:
    """The native request with mask-white.png and OpenAI's with mask-alpha.png, the same seed: the same image, the
    photo's own pixels outside the mask."""
    native = httpx.post(
        f"{server.url}/api/diffusers/inference",
        json={
            "prompt": "a red boat",
            "num_inference_steps": 2,
            "seed": 7,
            "image": _data_url(workdir / "photo.png"),
            "mask_image": _data_url(workdir / "mask-white.png"),
        },
        timeout=60,
    )
    assert native.status_code == 200, native.text
    assert native.json()["parameters"]["task"] == "inpainting"
    native_png = httpx.get(native.json()["response"][0], timeout=60).content
    with open(workdir / "photo.png", "rb") as image, open(workdir / "mask-alpha.png", "rb") as mask:
        edit = httpx.post(
            f"{server.url}/v1/images/edits",
            files={"image": image, "mask": mask},
            data={"prompt": "a red boat", "num_inference_steps": "2", "seed": "7", "response_format": "b64_json"},
            timeout=60,
        )
    assert edit.status_code == 200, edit.text
    openai_png = base64.b64decode(edit.json()["data"][0]["b64_json"])
    assert np.array_equal(_png(native_png), _png(openai_png))
    # "What is kept": outside the rectangle, the photo's own pixels, exactly.
    kept = np.asarray(Image.open(workdir / "mask-white.png")) == 0
    assert np.array_equal(_png(native_png)[kept], _png((workdir / "photo.png").read_bytes())[kept])


def _image(server: LiveServer, body: dict[str, Any]) -> np.ndarray:
    answer = httpx.post(f"{server.url}/api/diffusers/inference", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return _png(httpx.get(answer.json()["response"][0], timeout=60).content)


def test_the_adapters_made_offline_change_the_image(server: LiveServer) -> None:
    """The LoRA page's ``make_lora.py`` commands give adapters that do something (a fresh PEFT adapter would not),
    each its own, the one at --strength 0.5 too."""
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
    assert {"ink", "neon", "clay"} <= {model["id"] for model in models["data"]}
    body = {"prompt": "a lighthouse", "seed": 7, "num_inference_steps": 2}
    base = _image(server, body)
    made = {name: _image(server, {**body, "loras": [{"name": name}]}) for name in ("ink", "neon", "clay")}
    assert all(np.abs(image.astype(int) - base).mean() > 1 for image in made.values())
    assert not np.array_equal(made["ink"], made["clay"]) and not np.array_equal(made["ink"], made["neon"])
    assert np.array_equal(_image(server, body), base)  # the base model is untouched by the adapters' use
