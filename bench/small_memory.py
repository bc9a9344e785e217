"""Running in small memory, side by side in one run on the same model: each configuration's resident memory, images/s
and how far its images move from the full-precision model's; and the VAE decode's peak with and without tiles.

Each configuration loads in a fresh subprocess (freed pages of another load must not count), through the server's
own loader (``Pipelines.TextToImagePipelineSD3`` with its ``LoadOptions``), then generates ``--images`` images of
``--size`` (seeds 0, 1, ...) with the pipeline; the parent compares them with the first configuration's.

- ``full``: the model as loaded by default (fp32 on a CPU, bf16 on CUDA);
- ``int8``: ``--quantize transformer=int8``; ``int8-t5``: the transformer and T5 in int8; ``fp8``: the transformer in
  fp8 (CUDA, compute capability 8.9+);
- ``int8-naive``: the transformer quantized as a first try would (diffusers' ``from_pretrained`` with its default
  memory map, the map's file kept, no ``malloc_trim``): what the server's load path avoids;
- ``no-t5``: ``--no-t5``; ``encoders-cpu``: ``--encoders-device cpu`` (a GPU run: the text encoders in CPU memory).

Memory: on a CPU the process's resident set after the load, and its peak (VmHWM) while generating; on CUDA the
allocator's (allocated after the load, peak while generating), the process's resident set beside it.

    python bench/small_memory.py                       # random:small on this CPU, 256x256, 4 steps
    python bench/small_memory.py --model random:sd3.5-medium --device cuda --dtype bfloat16 --size 1024 \\
        --configs full,int8,fp8,encoders-cpu,no-t5      # bench/gpu.sh

A configuration that fails (fp8 where the GPU has none) is a row saying why, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {},
    "int8": {"quantize": {"transformer": "int8"}},
    "int8-t5": {"quantize": {"transformer": "int8", "text_encoder_3": "int8"}},
    "fp8": {"quantize": {"transformer": "fp8"}},
    "int8-naive": {"naive": "int8"},
    "no-t5": {"t5": False},
    "encoders-cpu": {"encoders_device": "cpu"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--configs", default="full,int8,int8-naive,int8-t5,no-t5")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--decode-size", type=int, default=1024, help="the tiled decode's measure (0: none)")
    parser.add_argument("--markdown", default=None, help="append the tables to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(sorted(unknown))}; use: {', '.join(CONFIGS)}")
    return args


# -- the child: one configuration ---------------------------------------------------------------------------------


def _load(args: argparse.Namespace, config: dict[str, Any]) -> tuple[Any, Any]:
    from models.options import LoadOptions
    from Pipelines import TextToImagePipelineSD3, preflight

    naive = config.get("naive")
    options = LoadOptions(
        quantize=config.get("quantize", {}), t5=config.get("t5", True), encoders_device=config.get("encoders_device")
    )
    preflight(args.model, args.device, args.dtype, options)  # as the server refuses (fp8 without fp8 units)
    loaded = TextToImagePipelineSD3(args.model, device=args.device, dtype=args.dtype, options=options).start()
    keep = None
    if naive:
        keep = _naive_quantize(loaded.pipeline, naive, loaded.dtype)
    return loaded, keep


def _naive_quantize(pipe: Any, kind: str, dtype: Any) -> Any:
    """The transformer through diffusers' from_pretrained as a first try would: memory-mapped, the file kept."""
    from models.quantize import component_config

    folder = tempfile.TemporaryDirectory(prefix="sd3-naive-")
    transformer = pipe.transformer
    transformer.save_pretrained(folder.name)
    cls, device = type(transformer), transformer.device
    pipe.transformer = None
    del transformer
    quantized = cls.from_pretrained(folder.name, quantization_config=component_config("transformer", kind),
                                    torch_dtype=dtype)  # fmt: skip
    pipe.transformer = quantized.to(device)
    return folder  # kept: its file stays mapped


def _memory(device: Any) -> dict[str, int]:
    import psutil
    import torch

    from engine.memory_meter import MemoryMeter

    info = {"rss": psutil.Process().memory_info().rss, "hwm": MemoryMeter("cpu").peak()}
    if device.type == "cuda":
        info.update(allocated=torch.cuda.memory_allocated(device), peak_allocated=torch.cuda.max_memory_allocated())
    return info


def _decode_peaks(pipe: Any, device: Any, side: int) -> dict[str, int]:
    """The peak bytes one decode of a ``side`` x ``side`` image adds, plain and tiled (diffusers' tiled decode)."""
    import torch

    from engine.memory_meter import MemoryMeter
    from utils.wrappers import TiledVAE

    meter = MemoryMeter(device)
    scale = int(pipe.vae_scale_factor)
    channels = int(pipe.vae.config.latent_channels)
    latents = torch.randn(1, channels, side // scale, side // scale, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, pipe.vae.dtype)
    peaks = {}
    with torch.no_grad():
        for name, vae in (("tiled", TiledVAE(pipe.vae)), ("plain", pipe.vae)):
            peaks[name] = meter.measure(lambda vae=vae: vae.decode(latents, return_dict=False))
    return peaks


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from models.quantize import trim_heap

    config = CONFIGS[args.child]
    started = time.perf_counter()
    loaded, keep = _load(args, config)
    trim_heap() if not config.get("naive") else None
    load_s = time.perf_counter() - started
    pipe, device = loaded.pipeline, loaded.device
    pipe.set_progress_bar_config(disable=True)
    after_load = _memory(device)
    state = pipe.transformer.state_dict()
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    call = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "output_type": "np"}
    pipe("warm-up", generator=torch.Generator().manual_seed(99), **call)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images, started, cpu = [], time.perf_counter(), time.process_time()
    for seed in range(args.images):
        images.append(
            pipe(f"a picture, number {seed}", generator=torch.Generator().manual_seed(seed), **call).images[0]
        )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    np.save(Path(args.work) / f"{args.child}.npy", np.stack(images))
    result = {
        "config": args.child,
        "load_s": load_s,
        "after_load": after_load,
        "while_generating": _memory(device),
        "transformer_bytes": weight_bytes,
        "images_per_s": args.images / seconds,
        # CPU seconds an image took, all threads together: the work, whatever else the machine runs meanwhile.
        "cpu_s_per_image": cpu / args.images,
    }
    if args.decode_size and args.child == "full":
        result["decode"] = _decode_peaks(pipe, device, args.decode_size)
    print("RESULT " + json.dumps(result), flush=True)
    del keep


# -- the parent: every configuration, then the tables -------------------------------------------------------------


def run_child(args: argparse.Namespace, name: str, work: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", name, "--work", work, "--model", args.model, "--device", args.device]
    argv += ["--size", str(args.size), "--steps", str(args.steps), "--images", str(args.images)]
    argv += ["--decode-size", str(args.decode_size)] + (["--dtype", args.dtype] if args.dtype else [])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        error = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        print(done.stderr[-3000:], file=sys.stderr)
        return {"config": name, "failed": f"exit {done.returncode}: {error[0][:200]}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def deviation(images: Any, reference: Any) -> dict[str, float]:
    """Mean and max absolute difference in 8-bit pixel levels, and PSNR (dB) against ``reference``."""
    import numpy as np

    a, b = (np.round(np.clip(x, 0, 1) * 255).astype(np.float64) for x in (images, reference))
    diff = np.abs(a - b)
    mse = float((diff**2).mean())
    return {
        "mean": float(diff.mean()),
        "max": float(diff.max()),
        "psnr": 99.0 if mse == 0 else 10 * np.log10(255**2 / mse),
    }


def report(args: argparse.Namespace, results: list[dict[str, Any]], work: str) -> str:
    import numpy as np

    mb = 2**20
    first = results[0]
    reference = np.load(Path(work) / f"{first['config']}.npy")
    cuda = "allocated" in first["after_load"]
    what = "GPU allocated after load / peak generating (MiB)" if cuda else "RSS after load / peak generating (MiB)"
    lines = [
        f"### {args.model}, {args.device}, {args.size}x{args.size}, {args.steps} steps, {args.images} images",
        "",
        f"| config | transformer weights (MiB) | {what} | images/s | CPU s per image | vs {first['config']}: mean / "
        "max pixel diff, PSNR |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        if "failed" in result:
            lines.append(f"| {result['config']} | failed: {result['failed'].replace('|', '/')} | | | | |")
            continue
        memory = (
            result["after_load"]["allocated" if cuda else "rss"],
            result["while_generating"]["peak_allocated" if cuda else "hwm"],
        )
        dev = deviation(np.load(Path(work) / f"{result['config']}.npy"), reference)
        lines.append(
            f"| {result['config']} | {result['transformer_bytes'] / mb:.0f} "
            f"({result['transformer_bytes'] / first['transformer_bytes']:.2f}x) | {memory[0] / mb:.0f} / "
            f"{memory[1] / mb:.0f} | {result['images_per_s']:.2f} "
            f"({result['images_per_s'] / first['images_per_s']:.2f}x) | {result['cpu_s_per_image']:.1f} "
            f"({result['cpu_s_per_image'] / first['cpu_s_per_image']:.2f}x) | {dev['mean']:.2f} / {dev['max']:.0f}, "
            f"{dev['psnr']:.1f} dB |"
        )
    decode = first.get("decode")
    if decode:
        side = args.decode_size
        plain, tiled = decode["plain"] / mb, decode["tiled"] / mb
        ratio = decode["tiled"] / max(1, decode["plain"])
        lines += ["", f"VAE decode of one {side}x{side} image, peak added: plain {plain:.0f} MiB, "
                  f"tiled {tiled:.0f} MiB ({ratio:.2f}x)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="small-memory-") as work:
        results = []
        for name in args.configs.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            results.append(run_child(args, name, work))
        if "failed" in results[0]:
            print(f"the first configuration ({results[0]['config']}) failed: nothing to compare with", file=sys.stderr)
            return 1
        text = report(args, results, work)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write("\n" + text)
    return 1 if any("failed" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
