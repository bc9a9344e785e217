"""Client script for the inference server: generate images, download them, optionally measure latency under load.

    python test.py --prompt "a red fox in the snow" --steps 28 --images 2 --seed 42
    python test.py --url http://gpu-box:8500 --concurrency 8 --steps 10
    python test.py --stream --steps 28        # as a job: a progress bar (steps, ETA, queue place) while it runs
    python test.py --image photo.png --prompt "in watercolour" --strength 0.5        # image-to-image
    python test.py --image photo.png --mask mask.png --prompt "a red boat"           # inpainting (white repaints)

Exit status: 0 when every request succeeded and every image was downloaded, 1 otherwise, 2 for bad arguments (or
when httpx, from requirements.txt, is missing: run it in the server's virtual environment), 130 when interrupted
(Ctrl-C; with --stream the jobs it started are cancelled). The API key is --api-key, else SERVER_API_KEY (the
server's own variable), so a shell that started the server with a key can run this unchanged.
This is a script for people; pytest does not collect it (see ``testpaths`` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

try:
    import httpx
except ImportError:  # run outside the virtual environment the server's requirements went into
    print(
        "test.py needs httpx (it is in requirements.txt): run it in the server's virtual environment "
        "(. .venv/bin/activate), or pip install httpx",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

ENDPOINT = "/api/diffusers/inference"
JOBS = "/api/jobs"
BAR_WIDTH = 24


class ClientError(Exception):
    """A failure explained in words fit to print."""


@dataclass
class Outcome:
    """One request's result: saved image paths, or the error that stopped it."""

    index: int
    latency_s: float
    paths: list[Path] = field(default_factory=list)
    seed: int | None = None
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description="Send text-to-image (or image edit) requests to the inference server.")
    parser.add_argument("--url", default="http://localhost:8500", help="server base URL [default: %(default)s]")
    parser.add_argument("--prompt", default="A futuristic cityscape, vibrant colors", help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="what the image should not show")
    parser.add_argument("--steps", type=_positive, default=None, help="denoising steps [default: the server's]")
    parser.add_argument("--images", type=_positive, default=1, help="images per request [default: %(default)s]")
    parser.add_argument(
        "--seed", type=_non_negative, default=None, help="seed; with --concurrency, request i uses seed+i"
    )
    parser.add_argument("--width", type=_positive, default=None, help="pixels, a multiple of 16 [default: the model's]")
    parser.add_argument(
        "--height", type=_positive, default=None, help="pixels, a multiple of 16 [default: the model's]"
    )
    parser.add_argument("--out", type=Path, default=Path("generated_images"), help="download directory [%(default)s]")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request [default: %(default)s]")
    parser.add_argument(
        "--concurrency", type=_positive, default=1, help="send N requests at once and summarise latency"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SERVER_API_KEY") or None,
        help="sent as 'Authorization: Bearer KEY' [default: $SERVER_API_KEY, the server's own variable]",
    )
    parser.add_argument("--image", type=_image_file, default=None, help="an image to edit (PNG, JPEG or WebP)")
    parser.add_argument(
        "--mask", type=_image_file, default=None, help="with --image: inpaint; white repaints, black keeps"
    )
    parser.add_argument("--strength", type=float, default=None, help="with --image: (0, 1] [default: the server's]")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="submit as jobs (/api/jobs) and show a progress bar on stderr (steps, ETA, queue place) while waiting",
    )
    args = parser.parse_args(argv)
    if urlparse(args.url).scheme not in ("http", "https") or not urlparse(args.url).netloc:
        parser.error(f"--url must look like http://host:port, not {args.url!r}")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.image is None and (args.mask is not None or args.strength is not None):
        parser.error("--mask and --strength edit an image: give --image too")
    return args


def _image_file(text: str) -> str:
    """An argparse type: a readable file, sent as a data: URL (the native API's image fields take them)."""
    path = Path(text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror}") from None
    kind = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower(), "png")
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _whole_number(minimum: int) -> Any:
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive = _whole_number(1)
_non_negative = _whole_number(0)


def build_payload(args: argparse.Namespace, index: int = 0) -> dict[str, Any]:
    """The JSON body of request number ``index``."""
    payload: dict[str, Any] = {"prompt": args.prompt, "num_images_per_prompt": args.images}
    optional = {
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "width": args.width,
        "height": args.height,
        "seed": None if args.seed is None else (args.seed + index) % 2**32,
        "image": args.image,
        "mask_image": args.mask,
        "strength": args.strength,
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


def error_message(response: httpx.Response) -> str:
    """The server's error envelope message, or the start of whatever it sent."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


def generate(
    client: httpx.Client,
    args: argparse.Namespace,
    index: int,
    progress: Progress | None = None,
    jobs: list[str] | None = None,
) -> Outcome:
    """Send one request (as a job followed to its end, with ``progress``), download its images into ``args.out``;
    never raises for HTTP or network failures."""
    started = time.perf_counter()
    try:
        if progress is not None:
            answer = follow_job(client, args, index, progress, [] if jobs is None else jobs)
        else:
            response = client.post(ENDPOINT, json=build_payload(args, index))
            if response.status_code != 200:
                raise ClientError(error_message(response))
            answer = response.json()
        paths = [download(client, url, args.out) for url in answer["response"]]
        return Outcome(index, time.perf_counter() - started, paths=paths, seed=answer.get("seed"))
    except ClientError as exc:
        return Outcome(index, time.perf_counter() - started, error=str(exc))
    except httpx.ConnectError as exc:
        error = f"cannot connect to {args.url} ({exc}); is the server running there?"
        return Outcome(index, time.perf_counter() - started, error=error)
    except httpx.TimeoutException:
        error = f"no answer within {args.timeout:g}s (raise --timeout for slow devices or many steps)"
        return Outcome(index, time.perf_counter() - started, error=error)
    except httpx.HTTPError as exc:
        return Outcome(index, time.perf_counter() - started, error=f"HTTP failure: {exc}")
    except (ValueError, KeyError, TypeError) as exc:
        return Outcome(index, time.perf_counter() - started, error=f"unexpected answer from the server: {exc!r}")


class Progress:
    """The progress of every job, drawn as one line on stderr: redrawn in place on a terminal; elsewhere (a pipe,
    a log) a new line only when something other than the step count moves, or every quarter of the steps."""

    def __init__(self, count: int) -> None:
        self.states: list[dict[str, Any]] = [{"state": "submitting"} for _ in range(count)]
        self.tty = sys.stderr.isatty()
        self._lock = threading.Lock()  # the jobs' threads update it together
        self._last_key: Any = None
        self._width = 0

    def update(self, index: int, **state: Any) -> None:
        with self._lock:
            self.states[index] = state
            self._draw()

    def _draw(self) -> None:
        line, key = self.render()
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self._width))
            self._width = len(line)
        elif key != self._last_key:
            sys.stderr.write(line + "\n")
        self._last_key = key
        sys.stderr.flush()

    def render(self) -> tuple[str, Any]:
        """The line, and what must change for a non-terminal to get a new one."""
        done = sum(s.get("step", 0) for s in self.states)
        total = sum(s.get("total", 0) for s in self.states)
        filled = BAR_WIDTH * done // total if total else 0
        bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total or '?'} steps"
        etas = [s["eta"] for s in self.states if s.get("eta") is not None]
        eta = f", ETA {max(etas):.1f}s" if etas else ""
        states = [s["state"] for s in self.states]
        if len(states) == 1:
            words = f"queued, position {self.states[0]['position']}" if states[0] == "queued" else states[0]
        else:
            words = ", ".join(f"{states.count(w)} {w}" for w in dict.fromkeys(states))
        quarter = 4 * done // total if total else 0
        return f"{bar}{eta} ({words})", (quarter, tuple(states), self.states[0].get("position"))

    def close(self) -> None:
        if self.tty and self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()


def follow_job(client: httpx.Client, args: argparse.Namespace, index: int, progress: Progress, jobs: list[str]) -> Any:
    """Submit request ``index`` as a job and follow its events until it ends; return its result (the synchronous
    API's answer). ``jobs`` collects the ids started, so an interrupted run can cancel them."""
    response = client.post(JOBS, json=build_payload(args, index))
    if response.status_code != 202:
        raise ClientError(error_message(response))
    job = response.json()
    jobs.append(job["id"])
    total = args.steps or 0
    with client.stream("GET", job["events_url"]) as events:
        if events.status_code != 200:
            events.read()
            raise ClientError(error_message(events))
        for name, data in sse_events(events):
            if name == "queued":
                progress.update(index, state="queued", position=data["position"], total=total)
            elif name == "started":
                progress.update(index, state="running", total=total)
            elif name == "step":
                total = data["total"]
                eta = data["elapsed_s"] / data["step"] * (total - data["step"])
                progress.update(index, state="running", step=data["step"], total=total, eta=eta)
            elif name == "done":
                progress.update(index, state=data["status"], step=data["step"], total=data["total_steps"])
                if data["status"] != "succeeded":
                    error = data.get("error") or {"message": f"the job was {data['status']}"}
                    raise ClientError(f"job {data['status']}: {error['message']}")
                return data["result"]
    raise ClientError("the server closed the job's event stream before the job ended")


def sse_events(response: httpx.Response) -> Any:
    """(event, data) pairs from a Server-Sent Events response; comment lines (keep-alives) are skipped."""
    name, data = "message", None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data = json.loads(line[len("data:") :])
        elif not line and data is not None:
            yield name, data
            name, data = "message", None


def download(client: httpx.Client, url: str, out_dir: Path) -> Path:
    """Save the image at ``url`` into ``out_dir`` under its own file name."""
    response = client.get(url)
    if response.status_code != 200:
        raise ClientError(f"downloading {url}: {error_message(response)}")
    name = Path(urlparse(url).path).name or "image.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_bytes(response.content)
    return path


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarise(outcomes: list[Outcome], wall_s: float) -> str:
    """A latency summary of the successful requests."""
    ok = [o for o in outcomes if o.error is None]
    lines = [f"requests: {len(outcomes)} sent, {len(ok)} ok, {len(outcomes) - len(ok)} failed in {wall_s:.2f}s"]
    if ok:
        latencies = [o.latency_s for o in ok]
        images = sum(len(o.paths) for o in ok)
        lines.append(
            f"latency: mean {statistics.fmean(latencies):.2f}s, p50 {percentile(latencies, 0.5):.2f}s, "
            f"p95 {percentile(latencies, 0.95):.2f}s, max {max(latencies):.2f}s"
        )
        lines.append(f"throughput: {images} image(s), {images / wall_s:.2f} images/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the requests; print saved paths (and a summary with --concurrency); return the exit status."""
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency)
    started = time.perf_counter()
    progress = Progress(args.concurrency) if args.stream else None
    jobs: list[str] = []
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        pool = ThreadPoolExecutor(max_workers=args.concurrency)
        try:
            outcomes = list(pool.map(lambda i: generate(client, args, i, progress, jobs), range(args.concurrency)))
        except KeyboardInterrupt:
            # The jobs would run on without us (that is what jobs are for): cancel the ones this run started.
            for job in list(jobs):
                with contextlib.suppress(httpx.HTTPError):
                    client.delete(f"{JOBS}/{job}")
            pool.shutdown(wait=True, cancel_futures=True)
            print(f"\ninterrupted; cancelled {len(jobs)} job(s)", file=sys.stderr)
            return 130
        finally:
            pool.shutdown(wait=False)
            if progress is not None:
                progress.close()
    wall_s = time.perf_counter() - started
    for outcome in outcomes:
        if outcome.error is not None:
            print(f"request {outcome.index}: error: {outcome.error}", file=sys.stderr)
            continue
        for path in outcome.paths:
            print(path)
        if args.concurrency == 1:
            print(f"seed {outcome.seed}, {outcome.latency_s:.2f}s")
    if args.concurrency > 1:
        print(summarise(outcomes, wall_s))
    return 0 if all(o.error is None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
