#!/usr/bin/env bash
# Calibration cost, pruning times and 2:4 sparse matmuls on one GPU, in one JSON, under 8 minutes.
#
#   bash scripts/gpu_check.sh [OUT_JSON] [--dry-run | gpu_check.py flags]   # from anywhere
#   bash scripts/gpu_check.sh --help                                        # this text and the flags
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh /tmp/gpu_check.json           # the CPU dry mode (CI)
#
# What it measures and its targets: the docstring of scripts/gpu_check.py. Random weights of the
# TinyLlama-1.1B shape (8 of 22 layers) and random tokens, so nothing is downloaded; llm-compressor's
# SparseGPT is timed too where `llmcompressor` imports. Exit status 1 if any section failed (its
# one-line error is in the JSON); the hard limit keeps it inside 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
  exec python scripts/gpu_check.py --help
fi
python -c 'import llm_gradprune' 2>/dev/null || { echo "install the package first: pip install -e ."; exit 2; }
OUT_JSON=${1:-gpu_check.json}
shift || true
export PYTHONUNBUFFERED=1
FLAGS=("$@")
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then FLAGS+=(--dry-run); fi
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
timeout 470 python scripts/gpu_check.py --out "$OUT_JSON" "${FLAGS[@]}"
