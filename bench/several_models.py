"""Several models in one server, side by side in one run: the memory of N models loaded separately against the same
N through one ``ModelSet`` (identical components loaded once), and the time to switch to a model that is not loaded.

The family is tests/model_dirs.py's (``large`` and ``medium`` share their text encoders' and VAE's files and differ in
their transformers; ``other`` shares nothing), of ``--preset`` (``random:encoder-heavy``: encoders outweighing the
transformer, as in SD3.5). Each memory case runs in a fresh subprocess and reports what its loads added to the
process's resident memory (RSS, after the imports):

- ``separate``: each model loaded by itself (``registry.loader.load_model``, a cache of its own per model);
- ``shared``: the same models through one ``ModelSet`` (budget unbounded);
- ``one``: the first model alone.

Switch times (a ``ModelSet`` whose budget holds one model, so a switch evicts): to ``other`` from disk, to ``medium``
from disk with ``large``'s encoders resident (a budget for the two), and on a GPU with ``--cpu-budget``, back from the
CPU tier. Medians of ``--repeats``.

    python bench/several_models.py                                     # this CPU, random:encoder-heavy
    python bench/several_models.py --device cuda --cpu-budget 4GB      # a GPU, with the CPU tier
    python bench/several_models.py --family DIR --rss-only --json      # the test's measurement
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="random:encoder-heavy")
    parser.add_argument("--family", default=None, help="the family's directory (written there when absent)")
    parser.add_argument(
        "--groups", nargs="+", default=["large,medium", "large,medium,other"], help="the models of each memory row"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-budget", default="0", help="the CPU tier's budget on a GPU (e.g. 4GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-only", action="store_true", help="only the memory cases")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    parser.add_argument("--markdown", default=None, help="append the tables to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _specs(family: Path, names: list[str]) -> list[Any]:
    from registry import parse_model_options

    return parse_model_options([f"{name}={family / name}" for name in names])


def _rss() -> int:
    import gc

    import psutil

    from models.quantize import trim_heap

    gc.collect()
    trim_heap()
    return psutil.Process().memory_info().rss


def _warm_imports() -> None:
    """Import everything a load imports, so that the baseline holds the libraries and the delta only the weights."""
    import diffusers
    import transformers

    from registry.loader import load_model  # noqa: F401

    for name in ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "AutoencoderKL"):
        getattr(diffusers, name)
    for name in ("CLIPTextModelWithProjection", "T5EncoderModel", "CLIPTokenizer", "T5Tokenizer"):
        getattr(transformers, name)


def _touch(pipeline: Any) -> None:
    """Read every weight once, as serving does: a checkpoint loaded through a memory map is resident only where read,
    and the RSS of a model that has not run yet would leave out its untouched pages."""
    import torch

    with torch.no_grad():
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.sum()


def child(args: argparse.Namespace) -> None:
    """One memory case in this process: print the bytes its loads added to the RSS."""
    import torch

    from models.options import LoadOptions
    from registry.components import ComponentCache
    from registry.loader import load_model
    from registry.models import ModelSet

    case, names = args.child.split(":")
    specs = _specs(Path(args.family), names.split(","))
    _warm_imports()
    before = _rss()
    kept: list[Any] = []
    if case == "separate":
        for spec in specs:
            kept.append(load_model(spec, LoadOptions(), torch.device("cpu"), torch.float32, ComponentCache()))
            _touch(kept[-1].pipeline)
    else:

        async def shared() -> None:
            models = ModelSet(specs, budget=1 << 50)
            for spec in specs:
                resident = await models.acquire(spec.name)
                _touch(resident.loaded.pipeline)
                models.release(resident)
            kept.append(models)

        asyncio.run(shared())
    print(json.dumps({"added": _rss() - before}))


def run_child(args: argparse.Namespace, case: str) -> int:
    argv = [sys.executable, __file__, "--family", args.family, "--child", case]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["added"]


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """The first model alone, then each group loaded separately and shared (MiB)."""
    first = args.groups[0].split(",")[0]
    groups = {
        group: {
            "separate": run_child(args, f"separate:{group}") / MIB,
            "shared": run_child(args, f"shared:{group}") / MIB,
        }
        for group in args.groups
    }
    return {"one": run_child(args, f"shared:{first}") / MIB, "groups": groups}


async def _timed(models: Any, name: str) -> float:
    started = time.perf_counter()
    models.release(await models.acquire(name))
    return time.perf_counter() - started


async def _switches(args: argparse.Namespace) -> dict[str, float]:
    from registry import parse_memory
    from registry.models import ModelSet

    family = Path(args.family)
    specs = _specs(family, ["large", "medium", "other"])
    probe = ModelSet(specs, budget=1 << 50, device=args.device)
    for spec in specs:
        await _timed(probe, spec.name)
    status = probe.status()["models"]
    await probe.stop()
    alone = {n: s["bytes_alone"] + s["bytes_shared"] for n, s in status.items()}
    times: dict[str, list[float]] = {"from disk": [], "from disk, encoders resident": [], "from the CPU tier": []}
    cpu_budget = parse_memory(args.cpu_budget, 1 << 50) if args.cpu_budget not in ("0", "") else 0
    one = ModelSet(specs, budget=max(alone.values()) + 1, device=args.device, cpu_budget=cpu_budget)
    two = ModelSet(
        specs, budget=alone["large"] + alone["medium"] - status["large"]["bytes_shared"] + 1, device=args.device
    )
    for _ in range(args.repeats):
        await _timed(one, "large")
        times[
            "from the CPU tier" if one.tiered and one.status()["models"]["other"]["state"] == "cpu" else "from disk"
        ].append(await _timed(one, "other"))
        await _timed(two, "other")  # neither large nor medium resident: then large, then medium beside it
        await _timed(two, "large")
        times["from disk, encoders resident"].append(await _timed(two, "medium"))
    await one.stop()
    await two.stop()
    return {k: statistics.median(v) for k, v in times.items() if v}


def report(args: argparse.Namespace, rss: dict[str, Any], switches: dict[str, float]) -> str:
    lines = [
        f"Several models (`python bench/several_models.py --preset {args.preset} --device {args.device}`): the "
        f"resident memory (RSS) each case's loads added, each case in a fresh process; one model alone: "
        f"{rss['one']:.0f} MiB.",
        "",
        "| models | loaded separately (MiB) | one ModelSet, shared (MiB) | shared / separate |",
        "|---|---|---|---|",
    ]
    for group, case in rss["groups"].items():
        ratio = case["shared"] / case["separate"]
        lines.append(f"| {group} | {case['separate']:.0f} | {case['shared']:.0f} | {ratio:.2f}x |")
    if switches:
        lines += ["", "| switch to an unloaded model | seconds (median) |", "|---|---|"]
        lines += [f"| {what} | {seconds:.3f} |" for what, seconds in switches.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from model_dirs import save_family

    with tempfile.TemporaryDirectory(prefix="several-models-") as work:
        args.family = args.family or work
        save_family(Path(args.family), preset=args.preset)
        rss = memory(args)
        switches = {} if args.rss_only else asyncio.run(_switches(args))
    table = report(args, rss, switches)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as handle:
            handle.write(table + "\n")
    if args.json:
        print(json.dumps({**rss, **{f"switch {k}": v for k, v in switches.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
