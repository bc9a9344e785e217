"""What a mid-generation preview costs: the fitted latent-to-RGB projection against a full VAE decode.

Builds only the VAE of a random preset (SD3.5-medium's VAE has the real shapes, so its cost is the real cost on
this device), then times, per preview image, ``LatentPreviewer`` (the server's choice) and ``vae.decode`` of the
same latents, side by side in one run, and the projection's one-time fit.

    python bench/previews.py --preset random:sd3.5-medium --sizes 512,1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def build_vae(preset: str) -> torch.nn.Module:
    """The preset's VAE alone, random weights."""
    from diffusers import AutoencoderKL

    from utils.random_models import _PRESET_CONFIGS, _VAE_COMMON

    torch.manual_seed(0)
    return AutoencoderKL(**_PRESET_CONFIGS[preset]["vae"], **_VAE_COMMON).eval()


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
    args = parser.parse_args(argv)

    from utils.previews import LatentPreviewer

    vae = build_vae(args.preset)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    previewer = LatentPreviewer(vae, scale)
    started = time.perf_counter()
    previewer.fit()
    print(f"{args.preset}: projection fitted once in {time.perf_counter() - started:.2f}s (at load)")
    print(f"{'size':>9} | {'projection (s)':>14} | {'VAE decode (s)':>14} | {'decode / projection':>19}")
    for side in (int(s) for s in args.sizes.split(",")):
        latents = torch.randn(1, vae.config.latent_channels, side // scale, side // scale)
        project = timed(lambda latents=latents: previewer(latents), args.repeats)

        def decode(latents: torch.Tensor = latents) -> None:
            with torch.no_grad():
                vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0))

        full = timed(decode, args.repeats)
        print(f"{side:>4}x{side:<4} | {project:>14.4f} | {full:>14.3f} | {full / project:>18.0f}x")


if __name__ == "__main__":
    main()
