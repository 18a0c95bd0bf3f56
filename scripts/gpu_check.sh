#!/usr/bin/env bash
# Calibration cost, pruning times, 2:4 sparse matmuls and offload on one GPU, in one JSON, under 12 minutes.
#
#   bash scripts/gpu_check.sh [OUT_JSON] [--dry-run | gpu_check.py flags]   # from anywhere
#   bash scripts/gpu_check.sh --help                                        # this text and the flags
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh /tmp/gpu_check.json           # the CPU dry mode (CI)
#
# What it measures and its targets: the docstring of scripts/gpu_check.py. Random weights of the
# TinyLlama-1.1B shape (8 of 22 layers) and random tokens, so nothing is downloaded; llm-compressor's
# SparseGPT is timed too where `llmcompressor` imports. Then the section offload_cpu_bigger_than_device
# (scripts/bench_offload.py --parts gpu): `--offload cpu`, sparsegpt, on a random Llama (hidden 2048)
# whose fp32 weights are 1.25x the device memory the run may use: the free memory, capped at
# GPU_CHECK_OFFLOAD_CAP_GIB (default 4; 0 = no cap, needs host memory and disk for the whole model) by
# torch.cuda.set_per_process_memory_fraction; the same run with `--offload none` must fail; it prints the
# report's peak device bytes. Exit status 1 if any section failed (its one-line error is in the JSON);
# the hard limits keep it inside 12 minutes.
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
DRY=${GPU_CHECK_DRY:-0}
for f in "${FLAGS[@]}"; do [ "$f" = --dry-run ] && DRY=1; done
if [ "$DRY" = 1 ] && [[ " ${FLAGS[*]} " != *" --dry-run "* ]]; then FLAGS+=(--dry-run); fi
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
status=0
timeout 470 python scripts/gpu_check.py --out "$OUT_JSON" "${FLAGS[@]}" || status=$?

# offload: a model bigger than the device memory the run may use (the dry mode hides the GPU: code path only)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OFFLOAD_ENV=()
if [ "$DRY" = 1 ]; then OFFLOAD_ENV=(CUDA_VISIBLE_DEVICES=); fi
env "${OFFLOAD_ENV[@]}" timeout 240 python scripts/bench_offload.py --parts gpu --num-samples 8 --seq-len 512 \
  --gpu-cap-gib "${GPU_CHECK_OFFLOAD_CAP_GIB:-4}" --work "$WORK" --out "$WORK/offload.json" || true
python - "$OUT_JSON" "$WORK/offload.json" <<'PY' || status=1
import json, sys
from pathlib import Path

out, part = Path(sys.argv[1]), Path(sys.argv[2])
result = json.loads(out.read_text()) if out.is_file() else {"errors": ["gpu_check.py wrote no JSON"]}
missing = {"error": "bench_offload.py wrote no JSON (timed out or crashed)"}
section = json.loads(part.read_text())["gpu"] if part.is_file() else missing
result["offload_cpu_bigger_than_device"] = section
if "error" in section:
    result["errors"] = [*result.get("errors", []), "offload_cpu_bigger_than_device"]
out.write_text(json.dumps(result, indent=1, default=str))
keys = ("layers", "weights_bytes", "cap_bytes", "peak_device_bytes", "error")
print(json.dumps({"offload_cpu_bigger_than_device": {k: section.get(k) for k in keys}}))
sys.exit(1 if "error" in section else 0)
PY
exit $status
