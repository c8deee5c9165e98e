#!/usr/bin/env bash
# traflow's CUDA check: ONE command on one GPU, under 8 minutes, no network.
#
# What it runs (benchmarks/gpu_check.py): on the cifar10 preset's 61.8M-parameter DDPM++ and the
# CIFAR-10 zip, a short `teacher train` and `distill` (every loss finite; a run SIGKILLed after
# its middle checkpoint and resumed ends within bf16 tolerance of an uninterrupted one),
# `traflow bench` of both (bf16, channels_last, TF32, torch.compile, CUDA graphs: student
# 1/2/4-NFE images/s at batch 1024, teacher Euler and RK45, the teacher's and the distillation's
# training steps, achieved TFLOP/s against the matmul peak measured in the same run),
# `sample -n 10000 --nfe 1` (samples/s with the PNG writes), and the bench again with
# runtime.compile=off and with precision=fp32, so each option's speed-up is a measured ratio.
# It prints one JSON summary (last line) and writes $OUT/gpu_check.json and $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh --prepare --data ZIP
#                          # here, once (needs the package index): the wheels the GPU image lacks
#                          # and ZIP (the CIFAR-10 training images as an EDM-layout zip) go into
#                          # .carry/ (ignored by git, carried by the call)
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu       # every stage at toy sizes on the CPU (CI runs it)
#   ... [--out DIR] [--only teacher,distill,sampling,training,sample,options] [--budget-s S]
#
# The device tool's call (one call; run it from the checkout that holds this code, after
# --prepare; .carry/ is about 58 MB of the 64 MiB a call may carry):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".carry"], timeout_s=540)
# The GPU image (Python 3.12, torch 2.11) has typer, rich, click, safetensors and numpy but not
# pydantic: --prepare downloads pydantic, pydantic-core, annotated-types, typing-inspection and,
# so that their versions match this project's, typing-extensions, typer, click, rich,
# shellingham, markdown-it-py, mdurl, pygments and safetensors, as cp312 manylinux wheels at the
# versions installed here; the GPU run installs them with pip --no-index into /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/.carry
MODE=gpu
OUT_DIR=${OUT:-$ROOT/runs/gpu_check}
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --prepare) MODE=prepare ;;
    --data) DATA=$2; shift ;;
    --out) OUT_DIR=$2; shift ;;
    --only|--budget-s) ARGS+=("$1" "$2"); shift ;;
    *) echo "error: unknown option $1 (use --cpu, --prepare --data ZIP, --out DIR, --only STAGES, --budget-s S)" >&2
       exit 2 ;;
  esac
  shift
done

WHEELS="pydantic pydantic-core annotated-types typing-inspection typing-extensions typer click
rich shellingham markdown-it-py mdurl pygments safetensors"
ZIP=cifar10-jpeg-train.zip

if [ "$MODE" = prepare ]; then
  if [ ! -f "${DATA:-}" ]; then
    echo "error: --prepare needs --data ZIP: the CIFAR-10 training images as an EDM-layout zip" >&2
    exit 2
  fi
  mkdir -p "$CARRY/whl" "$CARRY/data"
  rm -f "$CARRY"/whl/*.whl
  pins=$(python3 - $WHEELS <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
  # shellcheck disable=SC2086
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$CARRY/whl" $pins
  cp "$DATA" "$CARRY/data/$ZIP"
  ls "$CARRY/whl"
  du -sh "$CARRY"
  exit 0
fi

mkdir -p "$OUT_DIR"
if [ "$MODE" = gpu ]; then
  if [ -d "$CARRY/whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/traflow-site "$CARRY"/whl/*.whl
    export PYTHONPATH=/tmp/traflow-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ ! -f "$CARRY/data/$ZIP" ]; then
    echo "error: $CARRY/data/$ZIP not found; run 'bash benchmarks/gpu_check.sh --prepare' first" >&2
    exit 2
  fi
  ARGS+=(--data "$CARRY/data/$ZIP")
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec python3 "$ROOT/benchmarks/gpu_check.py" --mode "$MODE" --out "$OUT_DIR" "${ARGS[@]}"
