#!/usr/bin/env python
"""What the step engine's varied pass shapes cost oneDNN's caches of compiled convolutions (issue 29).

The step engine batches the transformer across requests, so the transformer's patch embedding (SD3's
``pos_embed.proj``, a convolution whose stride is the patch size) sees one input shape per (samples in the pass,
latent size): up to ``--max-batch`` times the sizes served. On a CPU, oneDNN compiles a convolution for every new
shape and keeps it in two caches, PyTorch's ideep cache (``LRU_CACHE_CAPACITY``) and oneDNN's primitive cache
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), 1,024 entries each. This runs the loaded model's convolution over every shape
twice and prints what each round added to the heap in use (glibc's ``mallinfo2``) and to the RSS, both after a
``malloc_trim(0)``: the first round pays for each shape, the second finds them cached. Set those variables to see
what they bound.

    python bench/conv_cache.py                                   # random:tiny, sizes 32,48,64,96, batches 1-32
    LRU_CACHE_CAPACITY=1 ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python bench/conv_cache.py
    python bench/conv_cache.py --no-mkldnn                       # the same convolution without oneDNN
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: models

MIB = 1 << 20
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


def measure(libc: ctypes.CDLL) -> tuple[int, int]:
    """(heap bytes in use, RSS) after handing the heap's free pages back."""
    libc.malloc_trim(0)
    info = libc.mallinfo2()
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return info.uordblks + info.hblkhd, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[32, 48, 64, 96])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--no-mkldnn", action="store_true", help="run the convolution without oneDNN")
    args = parser.parse_args(argv)
    import torch

    from models.random_build import build_random_pipeline

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    torch.set_num_threads(1)  # as one of the step engine's loops on this machine
    conv = build_random_pipeline(args.model).transformer.pos_embed.proj
    scale, channels = 8, conv.in_channels  # the VAE's factor; the latent channels
    shapes = [(b, h // scale, w // scale) for h in args.sizes for w in args.sizes for b in range(1, args.max_batch + 1)]
    flags = torch.backends.mkldnn.flags(enabled=False) if args.no_mkldnn else contextlib.nullcontext()
    rows = []
    with torch.no_grad(), flags:
        conv(torch.zeros(1, channels, shapes[0][1], shapes[0][2]))  # one shape before the count: the libraries load
        for label in ("first round", "second round, the same shapes"):
            heap, rss = measure(libc)
            for batch, height, width in shapes:
                conv(torch.zeros(batch, channels, height, width))
            after = measure(libc)
            rows.append(f"| {label} | {len(shapes)} | {(after[0] - heap) / MIB:+.1f} | {(after[1] - rss) / MIB:+.1f} |")
    env = " ".join(f"{name}={os.environ[name]}" for name in VARIABLES if name in os.environ)
    command = f"{env} python {shlex.join(['bench/conv_cache.py', *(sys.argv[1:] if argv is None else argv)])}"
    print(f"`{command.strip()}` ({args.model}'s patch embedding, torch {torch.__version__})\n")
    print("| round | shapes | heap in use added (MiB) | RSS added (MiB) |\n|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
