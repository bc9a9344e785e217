#!/usr/bin/env bash
# The whole GPU suite of bench/RESULTS.md in one command: both engines (threads = the `ours` arm, `step`), the step
# engine with and without --compile (`step-compile`), the in-process pipeline (`serial`, the compute limit), on
# random weights with the exact shapes of SD3.5-medium at 1024x1024 and 512x512, 28 steps, bf16. On CUDA every table
# comes with the GPU memory table (idle = one copy of the weights; peak against N) and the floor table. Then, on a
# GPU only, running in small memory (bench/small_memory.py): bf16 against the transformer in int8 and in fp8, the
# text encoders on the CPU (--encoders-device cpu) and no T5, each in its own process, at 1024x1024; and the VAE's
# decode of a 2048x2048 image with and without tiles (about 5 more minutes).
#
#   bench/gpu.sh                  on a GPU machine (planned for under 8 minutes on one H100/H200)
#   bench/gpu.sh --smoke          the same path on a CPU with random:tiny, tiny sizes and 2 steps (about a minute)
#   bench/gpu.sh --fetch-wheels   here, where pip reaches the registry: the packages a bare GPU machine lacks, into
#                                 .whl/ (carry that folder; the suite installs from it when it finds one)
#
# Options: --out FILE (the tables; default $OUT/gpu-results.md when $OUT is set, else bench/gpu-results.md),
# --results FILE (where the tables are appended, under a heading with the date and the device; default
# bench/RESULTS.md, and none for --smoke), --python PY (default: $PYTHON, else python3).
# Exit status: 0 when every run succeeded, 1 when a run failed (the other runs still run), 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

smoke=0
fetch=0
out=""
results=""
python="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --fetch-wheels) fetch=1 ;;
    --out) out="${2:?--out needs a file}"; shift ;;
    --results) results="${2:?--results needs a file}"; shift ;;
    --python) python="${2:?--python needs an interpreter}"; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# What the GPU machine's image lacks (it has torch, transformers, accelerate, numpy, pillow, psutil, httpx,
# prometheus-client, h11): the server's web stack, diffusers and optimum-quanto (--quantize), for its Python (3.12,
# x86-64 manylinux).
WHEELS="diffusers fastapi fastapi-offline starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv
annotated-types typing-inspection annotated-doc importlib-metadata optimum-quanto ninja"
if [ "$fetch" = 1 ]; then
  mkdir -p .whl
  for name in $WHEELS; do
    # The versions this machine's tests ran with, where it has them.
    version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null)
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$name${version:+==$version}" || { echo "bench/gpu.sh: could not fetch $name" >&2; exit 1; }
  done
  ls .whl
  exit 0
fi

if ! "$python" -c "import diffusers, fastapi, fastapi_offline, uvicorn, pydantic_settings, optimum.quanto" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
      .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "bench/gpu.sh: diffusers or the web stack is missing; run bench/gpu.sh --fetch-wheels where pip works" >&2
    exit 1
  fi
fi

if [ "$smoke" = 1 ]; then
  model="random:tiny" device="cpu" dtype="float32" steps=2 large=64 small=32 bursts="1,2" results_default=""
  # No compiler run on a CPU (about a minute for the tiny model): the step-compile arm still takes the --compile
  # path through the server, with TorchDynamo switched off, so the suite's path is the same and takes seconds.
  export TORCHDYNAMO_DISABLE=1
else
  model="random:sd3.5-medium" device="cuda" dtype="bfloat16" steps=28 large=1024 small=512 bursts="1,4"
  results_default="bench/RESULTS.md"
fi
[ -n "$results" ] || results="$results_default"
[ -n "$out" ] || out="${OUT:+$OUT/gpu-results.md}"
[ -n "$out" ] || out="bench/gpu-results.md"
mkdir -p "$(dirname "$out")"
: >"$out"
export PYTHONUNBUFFERED=1

status=0
run() {  # run TITLE ARGS...: one bench.py run, its tables appended to $out
  echo "== bench/gpu.sh: $1" >&2
  shift
  "$python" bench/bench.py --model "$model" --device "$device" --dtype "$dtype" --steps "$steps" \
    --bursts "$bursts" --poisson-rates "" --warmup 1 --load-timeout 600 --markdown "$out" "$@" || status=1
}

started=$(date +%s)
# Each run loads the model once per arm, one arm after another on CUDA (their memory would add up otherwise).
run "${large}x${large}: serial, threads (ours), step, step --compile" \
  --size "$large" --arms serial,ours,step,step-compile
run "${small}x${small}: threads (ours), step, step --compile" --size "$small" --arms ours,step,step-compile
if [ "$smoke" = 0 ]; then  # not in the smoke run: five more model loads (tests/test_bench_small_memory.py runs it)
  echo "== bench/gpu.sh: small memory: bf16, int8, fp8, encoders on the CPU, no T5" >&2
  {
    printf '\n## Run: small memory (bench/small_memory.py)\n\n'
    "$python" bench/small_memory.py --model "$model" --device "$device" --dtype "$dtype" --size "$large" \
      --steps "$steps" --images 4 --decode-size $((2 * large)) --configs full,int8,fp8,encoders-cpu,no-t5
  } >>"$out" || status=1
fi
elapsed=$(( $(date +%s) - started ))

device_name=$("$python" - "$device" <<'PY'
import sys

import torch

device = sys.argv[1]
if device.startswith("cuda") and torch.cuda.is_available():
    print(f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, torch {torch.__version__}")
else:
    print(f"CPU ({device}), torch {torch.__version__}")
PY
)
if [ -n "$results" ]; then
  {
    printf '\n## GPU suite %s on %s: %s, %s steps, %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$device_name" \
      "$model" "$steps" "$dtype"
    printf '`bash bench/gpu.sh%s` (%d s in all)\n' "$([ "$smoke" = 1 ] && echo ' --smoke')" "$elapsed"
    sed 's/^#/##/' "$out"  # each run's headings one level down, under the suite's
  } >>"$results"
  echo "bench/gpu.sh: tables in $out, appended to $results (${elapsed} s)" >&2
else
  echo "bench/gpu.sh: tables in $out (${elapsed} s)" >&2
fi
exit "$status"
