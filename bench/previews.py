"""What a mid-generation preview costs: the fitted latent-to-RGB projection against a full VAE decode.

Builds only the VAE of a random preset (SD3.5-medium's VAE has the real shapes, so its cost is the real cost on
this device), then times, per preview image, ``LatentPreviewer`` (the server's choice) and ``vae.decode`` of the
same latents, side by side in one run, and the projection's one-time fit.

    python bench/previews.py --preset random:sd3.5-medium --sizes 512,1024

``--stream`` times instead what one partial image costs an OpenAI stream (api/streaming.py): the projection, the
upscale to the requested size and the PNG + base64 encoding, and the size of the encoded image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def build_vae(preset: str) -> torch.nn.Module:
    """The preset's VAE alone, random weights."""
    from diffusers import AutoencoderKL

    from models.presets import PRESET_CONFIGS, VAE_COMMON

    torch.manual_seed(0)
    return AutoencoderKL(**PRESET_CONFIGS[preset]["vae"], **VAE_COMMON).eval()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after one warm-up."""
    fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="random:sd3.5-medium")
    parser.add_argument("--sizes", default="512,1024", help="image sides, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="the stream path's cost per partial image instead")
    args = parser.parse_args(argv)

    from engine.previews import LatentPreviewer

    vae = build_vae(args.preset)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    previewer = LatentPreviewer(vae, scale)
    started = time.perf_counter()
    previewer.fit()
    print(f"{args.preset}: projection fitted once in {time.perf_counter() - started:.2f}s (at load)")
    if args.stream:
        stream_costs(previewer, [int(s) for s in args.sizes.split(",")], args.repeats)
        return
    print(f"{'size':>9} | {'projection (s)':>14} | {'VAE decode (s)':>14} | {'decode / projection':>19}")
    for side in (int(s) for s in args.sizes.split(",")):
        latents = torch.randn(1, vae.config.latent_channels, side // scale, side // scale)
        project = timed(lambda latents=latents: previewer(latents), args.repeats)

        def decode(latents: torch.Tensor = latents) -> None:
            with torch.no_grad():
                vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0))

        full = timed(decode, args.repeats)
        print(f"{side:>4}x{side:<4} | {project:>14.4f} | {full:>14.3f} | {full / project:>18.0f}x")


def stream_costs(previewer: Any, sides: list[int], repeats: int) -> None:
    """Seconds per partial image of a stream: projection, upscale, PNG + base64 (median of ``repeats``)."""
    from api.streaming import encode_for_stream, upscale

    channels, scale = previewer.vae.config.latent_channels, previewer.scale
    print(f"{torch.get_num_threads()} torch thread(s); seconds per partial image, median of {repeats}")
    print(f"{'size':>9} | {'projection':>10} | {'upscale':>8} | {'PNG+b64':>8} | {'total':>7} | {'event KB':>8}")
    for side in sides:
        latents = torch.randn(1, channels, side // scale, side // scale)  # noise: the worst case for PNG
        [preview] = previewer(latents)
        size = (side, side)
        project = timed(lambda latents=latents: previewer(latents), repeats)
        upscaling = timed(lambda im=preview, s=size: upscale(im, s), repeats)
        large = upscale(preview, size)
        encode = timed(lambda im=large, s=size: encode_for_stream(im, s), repeats)
        kib = len(encode_for_stream(preview, size)) / 1024
        total = project + upscaling + encode
        times = f"{project:>10.4f} | {upscaling:>8.4f} | {encode:>8.4f} | {total:>7.4f}"
        print(f"{side:>4}x{side:<4} | {times} | {kib:>8.0f}")


if __name__ == "__main__":
    main()
