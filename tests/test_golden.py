"""Masks and reconstructed weights never change: every case of tests/golden.py against tests/golden.json.

The hashes were recorded before the pipeline was reshaped; a refactor that changes any mask, or skips
or alters a reconstruction, fails here. The two-process and FSDP cases also equal the one-process hash.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from llm_gradprune.errors import ConfigError

from .golden import CASES, DIST_CASES, FSDP_CASES, GOLDEN, LAYER_WISE_DIST_CASES, REFUSED_NOW, ROOT, run_case

RECORDED = json.loads(GOLDEN.read_text())


def same(got: dict, want: dict) -> bool:
    return (
        got["zeros"] == want["zeros"]
        and got["zero_count"] == want["zero_count"]
        and abs(got["abs_sum"] - want["abs_sum"]) <= 1e-6 * abs(want["abs_sum"])
    )


def test_every_case_is_recorded():
    assert set(RECORDED["single"]) == set(CASES)
    assert set(RECORDED["dist"]) == set(DIST_CASES) and set(RECORDED["fsdp"]) == set(FSDP_CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_one_process_case_is_unchanged(name):
    if name in REFUSED_NOW:
        same_as, message = REFUSED_NOW[name]
        assert RECORDED["single"][name] == RECORDED["single"][same_as]  # the option did nothing
        with pytest.raises(ConfigError, match=message):
            run_case(name)
        return
    got = run_case(name)
    assert same(got, RECORDED["single"][name]), (got, RECORDED["single"][name])


@pytest.mark.slow
def test_two_processes_and_fsdp_are_unchanged_and_equal_one_process(tmp_path):
    out = tmp_path / "dist.json"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tests.golden", "--dist", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    got = json.loads(out.read_text())
    for kind in ("dist", "fsdp"):
        for name, fp in got[kind].items():
            if name in LAYER_WISE_DIST_CASES:  # the layer-wise replicas against the one-process run
                assert same(fp, RECORDED["single"][name]), (kind, name, fp, RECORDED["single"][name])
                continue
            assert same(fp, RECORDED[kind][name]), (kind, name)
            assert fp["zeros"] == RECORDED["single"][name]["zeros"], (kind, name)
    assert set(LAYER_WISE_DIST_CASES) <= set(got["dist"])
