"""Generated from the support table: for every (execution path x option) pair, the run either shows the
option applied in its report, or is refused with exit 2, one line (the table's reason), nothing written.

One-process paths run the CLI in-process; the multi-process ones (replicated whole-model and layer-wise,
FSDP2 row shards) run in one two-process launch of tests/support_worker.py. Every report that comes
back has the same keys, whatever path wrote it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from llm_gradprune import commands
from llm_gradprune.config import PruneConfig
from llm_gradprune.support import PATH_TITLES, SupportQuery, check_support, refusal

from .support_cases import cases, option, settings, shown
from .support_worker import flags
from .tiny_folder import ROOT, make_model_folder, make_text_file


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("support-assets")
    return {"model": make_model_folder(root / "model"), "text": make_text_file(root / "t.txt")}


def nested_keys(report: dict) -> set[str]:
    keys = set(report)
    for section in ("calibration", "mode", "hessian_bytes", "timings_s"):
        keys |= {f"{section}.{k}" for k in report[section]}
    return keys


def check_case(path, name, rc, err, written, output) -> dict | None:
    opt = option(name)
    reason = opt.refused.get(path)
    if reason is not None:
        assert rc == 2, (path, name, err)
        assert err.strip().count("\n") == 0, err  # one line, nothing before it
        line = err.strip()
        assert (
            line == f"llm-gradprune: error: {name} is not supported on the {PATH_TITLES[path]} path: {reason}"
        )
        assert not written
        return None
    assert rc == 0, (path, name, err[-2000:])
    with open(os.path.join(output, "pruning_report.json")) as fh:
        report = json.load(fh)
    assert shown(name, report), (
        path,
        name,
        json.dumps({k: report[k] for k in ("calibration", "mode", "notes")}),
    )
    return report


@pytest.mark.parametrize(("path", "name"), cases(["whole_model", "layer_wise"]))
def test_one_process_pair_is_applied_or_refused(path, name, assets, tmp_path, capsys):
    out = tmp_path / "out"
    values = settings(option(name), path, str(tmp_path))
    argv = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--output-dir", str(out),
            *flags(values)]  # fmt: skip
    capsys.readouterr()
    rc = commands.main(argv)
    err = capsys.readouterr().err
    check_case(path, name, rc, err, out.exists(), out)
    if rc == 2:
        assert list(tmp_path.iterdir()) == []  # nothing written, no state folder either


@pytest.mark.slow
def test_multi_process_pairs_are_applied_or_refused(assets, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "tests" / "support_worker.py"),
           str(assets["model"]), str(assets["text"]), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {
        f"{p}|{n}"
        for p, n in cases(["whole_model_multi", "layer_wise_multi", "sharded", "layer_wise_sharded"])
    }
    keys = set()
    for key, r in results.items():
        path, name = key.split("|")
        report = check_case(path, name, r["rc"], r["stderr"], r["written"], r["output"])
        if report is not None:
            keys.add(frozenset(nested_keys(report)))
    assert len(keys) == 1  # one report builder: the same keys on every path


def test_every_report_has_the_same_keys(assets, tmp_path):
    seen = {}
    for path, extra in (("whole_model", {}), ("layer_wise", {"reconstruct": "lsq"}),
                        ("adaptive", {"criterion": "sparsegpt"})):  # fmt: skip
        out = tmp_path / path
        argv = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--output-dir", str(out),
                *flags({**settings(option("pattern N:M"), "whole_model", str(tmp_path)), **extra})]  # fmt: skip
        assert commands.main(argv) == 0
        seen[path] = nested_keys(json.loads((out / "pruning_report.json").read_text()))
    assert seen["whole_model"] == seen["layer_wise"] == seen["adaptive"]


def test_refusal_names_the_first_unsupported_option():
    run = SupportQuery(
        PruneConfig(criterion="token_fisher", reconstruct="lsq", rounds=2), processes=2, sharded=True
    )
    assert refusal(run).startswith(
        "per-token gradient statistics (token_fisher) is not supported on the layer-wise after FSDP2 statistics path"
    )
    run = SupportQuery(
        PruneConfig(criterion="fisher", reconstruct="lsq", rounds=2), processes=2, sharded=True
    )
    assert refusal(run).startswith(
        "pruning in rounds is not supported on the layer-wise after FSDP2 statistics"
    )
    check_support(SupportQuery(PruneConfig(criterion="fisher", reconstruct="lsq"), processes=2, sharded=True))
    check_support(SupportQuery(PruneConfig(criterion="sparsegpt"), processes=2))  # replicated: fine


def test_owl_sets_the_budgets_of_sparsegpt(assets, tmp_path):
    """sparsegpt selects no scope: OWL's layer sparsities become shares of each tensor's whole weights,
    and the total stays the target (it ended in a ValueError before)."""
    out = tmp_path / "out"
    argv = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--output-dir", str(out),
            "--num-samples", "4", "--seq-len", "16", "--no-progress", "--criterion", "sparsegpt",
            "--allocation", "owl", "--owl-lambda", "0.1"]  # fmt: skip
    assert commands.main(argv) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    layers = {k: v["sparsity"] for k, v in report["allocation"].items()}
    assert len(set(layers.values())) == len(layers) == 2  # OWL moved the layers apart
    for name, t in report["per_tensor"].items():
        layer = next(k for k in layers if name.startswith(k + "."))
        assert abs(t["masked"] / t["numel"] - layers[layer]) < 0.01, name
    assert report["masked_weights"] == report["target_weights"] // 2
