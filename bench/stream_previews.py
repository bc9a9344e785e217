"""What one partial image costs a streamed answer: projection, upscale to the requested size, PNG + base64.

The stream path (api/streaming.py) turns each preview of the latents into an ``image_generation.partial_image``
event: the engine projects the latents to RGB (``LatentPreviewer``, at 1/8 of the side), then the stream upscales it
to the requested size and encodes it (``encode_for_stream``). This times the three parts per image, on the VAE of a
random preset (SD3.5-medium's has the real shapes), with the median of ``--repeats`` runs after a warm-up.

    python bench/stream_previews.py --preset random:sd3.5-medium --sizes 512,1024
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from previews import build_vae, timed  # noqa: E402  (bench/previews.py, next to this script)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="random:sd3.5-medium")
    parser.add_argument("--sizes", default="512,1024", help="image sides, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from api.streaming import encode_for_stream, upscale
    from utils.previews import LatentPreviewer

    vae = build_vae(args.preset)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    previewer = LatentPreviewer(vae, scale)
    previewer.fit()
    threads = torch.get_num_threads()
    print(f"{args.preset}, {threads} torch thread(s); seconds per partial image, median of {args.repeats}")
    print(f"{'size':>9} | {'projection':>10} | {'upscale':>8} | {'PNG+b64':>8} | {'total':>7} | {'event KB':>8}")
    for side in (int(s) for s in args.sizes.split(",")):
        latents = torch.randn(1, vae.config.latent_channels, side // scale, side // scale)
        [preview] = previewer(latents)
        project = timed(lambda latents=latents: previewer(latents), args.repeats)
        size = (side, side)
        upscaling = timed(lambda p=preview, s=size: upscale(p, s), args.repeats)
        large = upscale(preview, size)
        encode = timed(lambda im=large, s=size: encode_for_stream(im, s), args.repeats)
        kib = len(encode_for_stream(preview, size)) / 1024
        total = project + upscaling + encode
        print(
            f"{side:>4}x{side:<4} | {project:>10.4f} | {upscaling:>8.4f} | {encode:>8.4f} | {total:>7.4f} | {kib:>8.0f}"
        )


if __name__ == "__main__":
    main()
