"""scripts/bench_experts.py --smoke: an untrained 2-layer, 4-expert Mixtral loses half its experts, and
the table's numbers are the ones worked out by hand from its shape."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def layer_params(experts: int, hidden: int = 64, inter: int = 128, kv: int = 32) -> int:
    """One decoder layer of the smoke model: q, o (H x H), k, v (kv x H), two norms, the router (E x H),
    E experts of gate, up and down (3 x H x I)."""
    return (
        2 * hidden * hidden + 2 * kv * hidden + 2 * hidden + experts * hidden + experts * 3 * hidden * inter
    )


@pytest.mark.slow  # ~8 s of CPU: the untrained model still has SmolLM2's 49152-token head
def test_smoke_removes_half_the_experts(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_experts.py"), "--smoke", "--keeps", "0.5",
           "--importances", "magnitude,random", "--recover-steps", "0", "--record", "", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["dense", "magnitude keep 0.5", "random keep 0.5"]
    dense = rows["dense"]
    assert (dense["experts"], dense["top_k"], dense["decoder_params"]) == (4, 2, 2 * layer_params(4))
    # untrained weights predict about uniformly over SmolLM2's 49152 tokens
    assert abs(math.log(dense["ppl_imdb"]) - math.log(49152)) < 0.1
    for name in ("magnitude keep 0.5", "random keep 0.5"):
        r = rows[name]
        assert (r["experts"], r["top_k"], r["decoder_params"]) == (2, 2, 2 * layer_params(2))
        assert r["decoder_kept_report"] == r["decoder_params"] / dense["decoder_params"]
        assert all(len(kept) == 2 for kept in r["experts_kept"].values()) and len(r["experts_kept"]) == 2
        assert math.isfinite(r["ppl_imdb"]) and math.isfinite(r["ppl_ood"])
    assert "| random keep 0.5 | 2 of 4 | 0.556 |" in proc.stdout
