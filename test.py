"""Client script for the inference server: generate images, download them, optionally measure latency under load.

    python test.py --prompt "a red fox in the snow" --steps 28 --images 2 --seed 42
    python test.py --url http://gpu-box:8500 --concurrency 8 --steps 10

Exit status: 0 when every request succeeded and every image was downloaded, 1 otherwise, 2 for bad arguments.
This is a script for people; pytest does not collect it (see ``testpaths`` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

ENDPOINT = "/api/diffusers/inference"


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
    parser = argparse.ArgumentParser(description="Send text-to-image requests to the inference server.")
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
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    args = parser.parse_args(argv)
    if urlparse(args.url).scheme not in ("http", "https") or not urlparse(args.url).netloc:
        parser.error(f"--url must look like http://host:port, not {args.url!r}")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


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


def generate(client: httpx.Client, args: argparse.Namespace, index: int) -> Outcome:
    """Send one request, download its images into ``args.out``; never raises for HTTP or network failures."""
    started = time.perf_counter()
    try:
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
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        if args.concurrency == 1:
            outcomes = [generate(client, args, 0)]
        else:
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                outcomes = list(pool.map(lambda i: generate(client, args, i), range(args.concurrency)))
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
