"""The GPU check's CPU dry mode runs every code path on a tiny random model and writes its one JSON."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "dry-run" and result["errors"] == []
    calib = result["calibration_bf16_stats_cpu"]
    for loop in ("plain", "ours"):  # one repeat of the 2 timed blocks of 32 tokens after the warm-up
        (seconds,) = calib[loop]["all_seconds"]
        assert calib[loop]["tokens_per_s"] == pytest.approx(2 * 32 / seconds)
    assert calib["speed_ratio"] == pytest.approx(
        calib["ours"]["tokens_per_s"] / calib["plain"]["tokens_per_s"]
    )
    assert calib["memory_ratio"].startswith("skipped")  # peak device memory needs a GPU
    prune = result["prune_bf16"]
    for run in (
        "sparsegpt-50",
        "sparsegpt-2:4",
        "recipe_50",
        "recipe_2of4",
        "regional-50",
        "block-fisher-50",
        "sparsegpt-50+block16",
        "sparsegpt-50+block4x1",
    ):
        assert prune[f"ours/{run}"]["target_sparsity"] == 0.5, run  # each run pruned exactly half
        assert prune[f"ours/{run}"]["peak_device_mb"] is None  # no device to measure on
    for run in (
        "regional-50",
        "block-fisher-50",
        "sparsegpt-50+block16",
        "sparsegpt-50+block4x1",
    ):  # against plain sparsegpt
        ratio = prune[f"ours/{run}"]["x_sparsegpt-50"]
        assert ratio == pytest.approx(prune[f"ours/{run}"]["seconds"] / prune["ours/sparsegpt-50"]["seconds"])
    assert prune.get("theirs", "").startswith("skipped") or "theirs/sparsegpt-2:4" in prune
    semi = result["semi_structured_2of4"]
    assert semi["all_2of4"] is True and semi["targets"] == 14  # 2 layers x 7 projections, read back
    assert semi["matmul"].startswith("skipped")
