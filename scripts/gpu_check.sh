#!/usr/bin/env bash
# Check medunet's CUDA paths (AMP bf16/fp16, GPU augmentation, stitching on the device and its host
# fallback, NCCL DDP, the planner's memory model, train + infer timing) on synthetic data in a few
# minutes, and write one JSON of pass/fail and numbers (see scripts/gpu_check.py).
#
# Usage: bash scripts/gpu_check.sh [OUT.json]     (after bash scripts/setup.sh; PYTHON=... to use another interpreter)
# Exit status: 0 all passed, 1 a check failed, 2 no CUDA device (nothing was run).
# It installs nothing: everything it needs comes with `bash scripts/setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.json}"
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
  echo "gpu_check: no $PYTHON; run bash scripts/setup.sh first (with a CUDA build of torch), or set PYTHON" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 570 "$PYTHON" scripts/gpu_check.py "$OUT"
