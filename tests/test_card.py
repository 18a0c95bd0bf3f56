"""The model card a Hugging Face user trusts: front matter the Hub reads (for a Hub-style base model and
for the built-in), a body with the method, data, per-layer table and measurements, a loading snippet
that really loads the checkpoint, no local absolute path, and the plots (or why they were skipped)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import yaml

from llm_gradprune import commands as cli
from llm_gradprune.config import JobConfig
from llm_gradprune.io.card import model_card

from .tiny_folder import make_model_folder, make_text_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model = make_model_folder(root / "tiny-llama")
    (model / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")
    text = make_text_file(root / "t.txt")
    out = root / "runs" / "tiny-pruned"
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "4", "--seq-len", "16",
            "--criterion", "fisher", "--pattern", "2:4", "--eval", "--eval-num-samples", "2", "--output-dir",
            str(out), "--no-progress"]  # fmt: skip
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):  # the log writes to stderr
        assert cli.main(argv) == 0
    return {"root": root, "out": out, "model": model, "said": said.getvalue()}


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_local_base_model_card_fields_and_body(run):
    meta, body = split_card((run["out"] / "README.md").read_text())
    assert "base_model" not in meta and "datasets" not in meta  # a bare local folder and a local text file
    assert meta["license"] == "mit"  # copied from the base model's own card
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "llm-gradprune", "2:4", "fisher"} <= set(meta["tags"])
    report = json.loads((run["out"] / "pruning_report.json").read_text())
    assert body.startswith("# tiny-llama, 2:4 sparse (fisher)")
    assert "w² · E_b[g²]" in body and "scope `n:m`, pattern `2:4`" in body
    assert f"({report['calibration']['tokens']:,} tokens) of `t.txt`" in body
    assert "| layer | q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj |" in body
    assert "target matrices (18,432 weights: the attention and MLP matrices) are exactly zero" in body
    assert "| attention | 8 | 6,144 |\n| MLP | 6 | 12,288 |\n| all | 14 | 18,432 |" in body
    assert "every Linear" not in body and "router" not in body.lower()
    assert "| 0 | 50.0% | 50.0% | 50.0% | 50.0% | 50.0% | 50.0% | 50.0% |" in body
    ev = report["eval"]
    assert f"| dense | {ev['dense_ppl']:.2f} |" in body and f"{ev['windows']} windows of 16 tokens" in body
    assert "What the zeros buy" in body and "llm-gradprune prune --config prune_config.yaml" in body
    assert str(run["root"]) not in body and "/tmp" not in body  # names a user can read, no local paths


def test_a_default_replaced_is_said_once_and_the_summary_names_the_kinds(run):
    """The 2:4 note was logged while planning and printed again in the summary."""
    assert run["said"].count("sparsity set to 0.5 by pattern 2:4") == 1
    assert "pattern 2:4); attention 8, MLP 6\n" in run["said"]
    assert json.loads((run["out"] / "pruning_report.json").read_text())["notes"] == [
        "sparsity set to 0.5 by pattern 2:4"
    ]


def test_the_loading_snippet_loads_the_checkpoint(run):
    body = (run["out"] / "README.md").read_text()
    code = body.split("## Use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    check = (
        code
        + "\nimport torch\nassert int((model.model.layers[0].mlp.up_proj.weight == 0).sum()) == 64 * 32 // 2\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], cwd=run["out"].parent, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_plots_are_written_and_embedded(run):
    pytest.importorskip("matplotlib")
    report = json.loads((run["out"] / "pruning_report.json").read_text())
    assert report["plots"] == {"files": ["sparsity.png", "perplexity.png"]}
    for name in report["plots"]["files"]:
        assert (run["out"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (run["out"] / "README.md").read_text()


def test_without_matplotlib_the_plots_are_skipped_and_said(run, monkeypatch, tmp_path):
    import builtins

    from llm_gradprune.io.plots import write_plots

    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    report = json.loads((run["out"] / "pruning_report.json").read_text())
    got = write_plots(report, tmp_path)
    assert got == {"skipped": "matplotlib is not installed (pip install 'llm-gradprune[plot]')"}
    assert list(tmp_path.iterdir()) == []
    report["plots"] = got
    card = model_card(
        JobConfig.from_flat({"output_dir": "x", "criterion": "fisher", "pattern": "2:4"}).to_flat(), report
    )
    assert "(Plots skipped: matplotlib is not installed" in card


def test_hub_style_and_builtin_base_models():
    report = json.loads(json.dumps(SAMPLE_REPORT))
    report["base_model"] = {
        "hub_id": "meta-llama/Llama-2-7b-hf",
        "name": "Llama-2-7b-hf",
        "license": "llama2",
    }
    report["calibration_dataset"] = "stanfordnlp/imdb"
    cfg = JobConfig.from_flat({"model": "meta-llama/Llama-2-7b-hf", "dataset": "stanfordnlp/imdb",
                               "output_dir": "/home/me/out/llama-24", "criterion": "fisher"})  # fmt: skip
    meta, body = split_card(model_card(cfg.to_flat(), report, model_id="me/llama-2-7b-fisher-50"))
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf" and meta["license"] == "llama2"
    assert meta["datasets"] == ["stanfordnlp/imdb"]
    assert body.startswith("# Llama-2-7b-hf, 50% sparse (fisher)")
    assert 'from_pretrained("me/llama-2-7b-fisher-50")' in body and "/home/me" not in body
    from llm_gradprune.models import describe_dataset, describe_model

    base = describe_model("builtin:smollm2-135m")
    assert base == {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "name": "SmolLM2-135M-Instruct",
                    "license": "apache-2.0"}  # fmt: skip
    assert describe_dataset("builtin:imdb") == "stanfordnlp/imdb" and describe_dataset("/data/x.txt") is None


SAMPLE_REPORT = {
    "criterion": "fisher", "criterion_params": {}, "scope": "row", "pattern": "unstructured", "target_sparsity": 0.5,
    "allocation_method": "uniform", "targets": 1, "target_weights": 8, "overall_sparsity": 0.5,
    "mode": {"reconstruct": "none", "executor": "whole_model"}, "seed": 0,
    "calibration": {"batches": 2, "tokens": 64, "batch_size": 1, "seq_len": 32},
    "dataset": {"name": "stanfordnlp/imdb", "split": "train"},
    "per_tensor": {"model.layers.0.mlp.up_proj.weight": {"numel": 8, "zeros": 4, "masked": 4}},
    "eval": None, "eval_tasks": None, "plots": {"files": []},
}  # fmt: skip
