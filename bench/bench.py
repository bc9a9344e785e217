#!/usr/bin/env python
"""Side-by-side benchmark: serial pipeline calls, thread-per-request, and our server, on one model and workload.

Arms (see bench/README.md):
- ``serial``: plain ``pipe(...)`` calls one after another in this process: the machine's compute limit.
- ``serial-opt``: the same with the GPU options given (``--fuse-qkv``, ``--attention-backend``, ``--compile``);
  added automatically when any option is set, to measure whether it helps before a server adopts it.
- ``thread``: the reference's approach: every request in its own thread on a request-scoped view, no admission
  limit (our server with ``--max-concurrency 256 --max-queue 1000``), over HTTP.
- ``ours``: our server with its default scheduling, over HTTP.

Workloads: bursts of N simultaneous requests, then open-loop Poisson arrivals at fractions of the serial arm's
measured capacity. Tables go to stdout (Markdown); progress goes to stderr. Exit status: 0 when every request
succeeded, 1 when some failed, 2 for bad arguments.

Example: ``python bench/bench.py --bursts 1,4,16 --markdown bench/RESULTS.md``
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

# Run as a script, bench/ is sys.path[0]; loaded from its file (tests/test_bench.py), it may be missing.
BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
# Set before transformers is imported: the tokenizers' own thread pool would fight the generation threads.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The parts live in bench/benchlib/; their names are re-exported here, where the tests and users find them.
from benchlib.arms import ARMS, Arm, SerialArm, ServerArm, free_port, make_arm  # noqa: E402
from benchlib.common import GIB, MIB, REPO, log  # noqa: E402
from benchlib.driver import Driver, benchmark, capacity_of, run_workload  # noqa: E402
from benchlib.engines import render_engines  # noqa: E402
from benchlib.options import (  # noqa: E402
    SDPA_BACKENDS,
    FusedJointAttnProcessor,
    apply_options,
    estimate_flops,
    fuse_qkv,
    options_given,
    sdpa_backend_context,
)
from benchlib.report import (  # noqa: E402
    TARGET_MIN_BURST,
    TARGET_VS_SERIAL_THROUGHPUT,
    TARGET_VS_THREAD_LATENCY,
    TARGET_VS_THREAD_THROUGHPUT,
    Report,
    fmt_gib,
    fmt_mib,
    fmt_ratio,
    fmt_s,
    machine_info,
    render,
)
from benchlib.stats import PeakRSS, Run, Sample, Stats  # noqa: E402
from benchlib.workloads import Seeds, Workload  # noqa: E402

__all__ = [
    "ARMS",
    "GIB",
    "MIB",
    "REPO",
    "SDPA_BACKENDS",
    "TARGET_MIN_BURST",
    "TARGET_VS_SERIAL_THROUGHPUT",
    "TARGET_VS_THREAD_LATENCY",
    "TARGET_VS_THREAD_THROUGHPUT",
    "Arm",
    "Driver",
    "FusedJointAttnProcessor",
    "PeakRSS",
    "Report",
    "Run",
    "Sample",
    "Seeds",
    "SerialArm",
    "ServerArm",
    "Stats",
    "Workload",
    "apply_options",
    "benchmark",
    "build_parser",
    "capacity_of",
    "estimate_flops",
    "fmt_gib",
    "fmt_mib",
    "fmt_ratio",
    "fmt_s",
    "free_port",
    "fuse_qkv",
    "log",
    "machine_info",
    "main",
    "make_arm",
    "options_given",
    "parse_args",
    "render",
    "render_engines",
    "run_workload",
    "sdpa_backend_context",
]


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("every value must be >= 1")
    return values


def _fractions(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("every rate must be > 0")
    return values


def _arms(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/bench.py",
        description="Serial vs thread-per-request vs our server, side by side (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="random:tiny", help="hub id, local directory or random:<preset>")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the server's choice)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the server's choice)")
    parser.add_argument("--size", type=int, default=128, help="image width and height (pixels)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on the beach")
    parser.add_argument("--bursts", type=_ints, default=[1, 4, 16], help="burst sizes N, comma-separated")
    parser.add_argument(
        "--poisson-rates",
        type=lambda t: _fractions(t) if t.strip() else [],
        default=[0.5, 0.8, 1.0],
        help="open-loop arrival rates as fractions of the measured serial capacity ('' for none)",
    )
    parser.add_argument("--poisson-requests", type=int, default=24, help="requests per Poisson rate")
    parser.add_argument("--arms", type=_arms, default=["serial", "thread", "ours"], help=f"from {', '.join(ARMS)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every workload per arm (pooled)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests per arm after loading")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrival times and the image seeds")
    parser.add_argument(
        "--interleave",
        choices=("auto", "yes", "no"),
        default="auto",
        help="run the arms round-robin per workload (auto: yes on CPU, no on CUDA, where the servers' memory "
        "would add up)",
    )
    parser.add_argument("--load-timeout", type=float, default=900.0, help="seconds a server may take to load")
    parser.add_argument("--markdown", type=Path, default=None, help="append the report to this Markdown file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' temporary dirs and logs")
    parser.add_argument(
        "--ours-args",
        default="",
        help="extra server flags for the ours arm, to try a candidate default (e.g. '--max-concurrency 2'); "
        "the report shows the command",
    )
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the ours arm's server (repeatable), e.g. OMP_NUM_THREADS=1",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the floor (CUDA: 800)")
    add_engine_options(parser)
    add_gpu_options(parser)
    return parser


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    options = parser.add_argument_group("the engines' comparison (see bench/README.md)")
    options.add_argument(
        "--sizes",
        type=_ints,
        default=None,
        help="run everything at each of these sizes, one report each (overrides --size); with the threads and step "
        "arms, a summary of the engines follows (e.g. --arms threads,step --sizes 128,512)",
    )
    options.add_argument(
        "--warmup-burst",
        type=int,
        default=0,
        help="then one unmeasured burst of this many requests per server arm: a step server learns its pass times "
        "at the workload's size (its calibration measures the model's default size) before anything is measured",
    )


def add_gpu_options(parser: argparse.ArgumentParser) -> None:
    options = parser.add_argument_group("GPU options (serial-opt arm; see bench/README.md)")
    options.add_argument("--fuse-qkv", action="store_true", help="fuse the attention QKV projections")
    options.add_argument("--attention-backend", choices=SDPA_BACKENDS, default="default", help="torch SDPA backend")
    options.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    options.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode (not reduce-overhead: CUDA graphs are unsafe with concurrent threads)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.warmup, args.warmup_burst) < 0 or args.poisson_requests < 1 or args.steps < 1:
        parser.error("--repeats, --poisson-requests and --steps must be >= 1, --warmup and --warmup-burst >= 0")
    if any("=" not in e for e in args.ours_env):
        parser.error("--ours-env takes KEY=VALUE")
    if args.size % 16 or any(size % 16 for size in args.sizes or []):
        parser.error("--size must be a multiple of 16")
    if options_given(args) and "serial-opt" not in args.arms:
        args.arms.insert(args.arms.index("serial") + 1 if "serial" in args.arms else 0, "serial-opt")
    if "serial-opt" in args.arms and not options_given(args):
        parser.error("the serial-opt arm needs --fuse-qkv, --attention-backend or --compile")
    return args


def _run(args: argparse.Namespace, command: str) -> Report:
    report = Report(args=args, command=command, arms=args.arms)
    report.machine = machine_info(args)
    started = time.perf_counter()
    benchmark(args, report)
    report.elapsed_s = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join(["bench/bench.py", *(sys.argv[1:] if argv is None else argv)])
    reports = [_run(argparse.Namespace(**{**vars(args), "size": size}), command) for size in args.sizes or [args.size]]
    text = "\n\n".join(render(report) for report in reports)
    if "threads" in args.arms and "step" in args.arms:
        text += "\n\n" + render_engines(reports)
    print(text, flush=True)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        with args.markdown.open("a") as handle:
            handle.write("\n" + text + "\n")
        log(f"report appended to {args.markdown}")
    failed = sum(len(s.failures) for r in reports for by_arm in r.results.values() for s in by_arm.values())
    if failed:
        log(f"{failed} request(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
