"""The typed report: `Report.from_dict` reads what a sparse run, a structured run with recovery and an older
folder wrote; every field is the JSON key of the same name, and the card reads the same values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llm_gradprune import commands as cli
from llm_gradprune.io.card import model_card
from llm_gradprune.io.hub import default_commit_message
from llm_gradprune.report import CALIBRATION_RECORD, Calibration, Report, calibration_record

from .tiny_folder import make_model_folder, make_text_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One sparse run (2:4, evaluated) and one structured run (evaluated, with recovery)."""
    root = tmp_path_factory.mktemp("report")
    model, text = make_model_folder(root / "m"), make_text_file(root / "t.txt")
    common = ["--model", str(model), "--dataset", str(text), "--num-samples", "4", "--seq-len", "16",
              "--batch-size", "2", "--no-progress", "--threads", "1", "--eval", "--eval-num-samples", "2"]  # fmt: skip
    runs = {"sparse": ["--criterion", "fisher", "--pattern", "2:4"],
            "structured": ["--structure", "mixed", "--recover-steps", "2"]}  # fmt: skip
    for name, extra in runs.items():
        assert cli.main(["prune", *common, *extra, "--output-dir", str(root / name)]) == 0
    return {name: root / name for name in runs}


def _report(folder: Path) -> dict:
    return json.loads((folder / "pruning_report.json").read_text())


def _same(section, d: dict, where: str) -> None:
    """Every field of `section` is `d`'s key of the same name (sub-sections and tables recursively)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name not in d:
            assert value == f.default or value == f.default_factory(), f"{where}.{f.name}: not in the dict"
        elif dataclasses.is_dataclass(value):
            _same(value, d[f.name], f"{where}.{f.name}")
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            assert list(value) == list(d[f.name])
            for key, item in value.items():
                _same(item, d[f.name][key], f"{where}.{f.name}[{key}]")
        else:
            assert value == d[f.name], f"{where}.{f.name}"


def test_a_sparse_report_reads_back_field_for_field(saved):
    d = _report(saved["sparse"])
    r = Report.from_dict(d)
    assert r.kind == "sparse" and not r.structured and r.shrinking is None
    _same(r.sparsity, d, "sparsity")
    for name in ("calibration", "eval", "dataset", "base_model", "plots"):
        _same(getattr(r, name), d[name], name)
    assert (
        r.recovery is None and r.eval_tasks is None and r.push is None and r.output_dir is None
    )  # not saved
    assert (r.model, r.seed, r.verified, r.file_bytes, r.notes) == (d["model"], d["seed"], True, d["file_bytes"], d["notes"])  # fmt: skip
    assert r.sparsity.pattern == "2:4" and r.sparsity.mode.executor == d["mode"]["executor"]
    assert (
        sum(t.zeros for t in r.sparsity.per_tensor.values()) == r.sparsity.zero_weights == d["zero_weights"]
    )
    assert r.eval.pruned_ppl == d["eval"]["pruned_ppl"] and r.eval.recovered_ppl is None


def test_a_structured_report_with_recovery_reads_back_field_for_field(saved):
    d = _report(saved["structured"])
    r = Report.from_dict(d)
    assert r.kind == "structured" and r.structured and r.sparsity is None
    _same(r.shrinking, d, "shrinking")
    for name in ("calibration", "eval", "recovery", "dataset", "base_model", "plots"):
        _same(getattr(r, name), d[name], name)
    assert r.shrinking.shape_after.intermediate_size == d["shape_after"]["intermediate_size"]
    assert r.shrinking.params_after.decoder / r.shrinking.params_before.decoder == r.shrinking.decoder_kept
    assert r.recovery.steps == 2 and r.recovery.data.token_sha256 == d["recovery"]["data"]["token_sha256"]
    assert r.eval.recovered_ppl == d["eval"]["recovered_ppl"] is not None
    assert r.calibration.passes == d["calibration"]["passes"] and r.calibration.tokens == 64


def test_one_calibration_record_for_every_kind(saved):
    assert [f.name for f in dataclasses.fields(Calibration)] == list(CALIBRATION_RECORD)
    assert dataclasses.asdict(Calibration()) == CALIBRATION_RECORD  # the same defaults
    for folder in saved.values():
        assert list(_report(folder)["calibration"]) == list(CALIBRATION_RECORD)
    a, b = calibration_record(), calibration_record()
    a["statistics"].append("x")
    assert b["statistics"] == [] and CALIBRATION_RECORD["statistics"] == []  # no shared default list
    with pytest.raises(KeyError, match="not calibration record fields"):
        calibration_record(blocks_read=3)


def test_an_older_folders_report_missing_newer_keys_parses(saved):
    """Folders written before the unified calibration record, recovery's data, plots and the job's keys."""
    d = _report(saved["sparse"])
    for key in ("model", "dataset", "seed", "base_model", "calibration_dataset", "plots", "versions", "notes",
                "masked_weights", "empty_tensors", "rounds", "hessian_bytes", "peak_memory_bytes"):  # fmt: skip
        d.pop(key)
    d["calibration"] = {"batches": 2, "tokens": 64}
    d["eval"] = {
        k: d["eval"][k] for k in ("dense_ppl", "pruned_ppl", "tokens", "windows", "split", "seq_len")
    }
    d["mode"] = {"executor": "whole_model", "reconstruct": "none"}
    d["unknown_future_key"] = {"x": 1}
    r = Report.from_dict(d)
    assert (
        r.model is None
        and r.dataset is None
        and r.plots is None
        and r.notes == []
        and r.sparsity.rounds is None
    )
    assert r.calibration.batch_size is None and r.calibration.statistics == [] and r.calibration.tokens == 64
    assert r.eval.token_sha256 is None and r.sparsity.mode.layer_wise is None
    settings = {
        "output_dir": "/x/old",
        "model": "/models/tiny",
        "dataset": "d.txt",
        "split": "train",
        "seed": 7,
    }
    card = model_card(settings, d)
    assert (
        "# tiny, 2:4 sparse (fisher)" in card and "micro-batches of ? x ? tokens" in card and "seed 7" in card
    )
    assert default_commit_message(d) == "Upload pruned checkpoint (fisher, pattern 2:4) with llm-gradprune"


def test_the_readers_take_the_dict_or_the_report_alike(saved):
    for folder in saved.values():
        d = _report(folder)
        settings = {"output_dir": str(folder)}
        assert model_card(settings, d) == model_card(settings, Report.from_dict(d))
        assert default_commit_message(d) == default_commit_message(Report.from_dict(d))
