"""Structured pruning as a job: `prune --structure ...` end to end on a tiny Llama folder, the report,
card and config it writes, push verification of the smaller checkpoint, recovery after it, and the
settings refused alongside it (each in one line, exit 2, before any work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llm_gradprune import commands as cli
from llm_gradprune.config import JobConfig
from llm_gradprune.errors import ConfigError
from llm_gradprune.io.hub import check_pushable

from .tiny_folder import ROOT, make_model_folder, make_text_file


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("structure")
    return root, make_model_folder(root / "model"), make_text_file(root / "t.txt")


def prune(assets, out: str, *extra: str) -> Path:
    root, model, text = assets
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "8", "--seq-len", "32",
            "--output-dir", str(root / out), "--no-progress", *extra]  # fmt: skip
    assert cli.main(argv) == 0
    return root / out


@pytest.fixture(scope="module")
def shrunk(assets) -> Path:
    return prune(assets, "small", "--structure", "mixed", "--target-params", "0.7", "--eval",
                 "--eval-num-samples", "4", "--recover-steps", "3", "--recover-batch-size", "2", "--recover-lr", "1e-3")  # fmt: skip


def held_out_ppl(folder: Path, text: Path, capsys) -> float:
    """The `eval` command on the job's evaluation windows (4 x 32 tokens of the text's held-out part)."""
    capsys.readouterr()
    argv = ["eval", str(folder), "--dataset", str(text), "--eval-num-samples", "4", "--eval-seq-len", "32",
            "--no-progress", "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]


def test_prune_structure_writes_a_smaller_model_plain_transformers_loads(assets, shrunk, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, model_dir, text = assets
    report = json.loads((shrunk / "pruning_report.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    small = AutoModelForCausalLM.from_pretrained(shrunk)  # no trust_remote_code
    config = AutoConfig.from_pretrained(shrunk)
    assert type(config).__name__ == "LlamaConfig"
    for key, value in report["shape_after"].items():
        assert getattr(config, key) == value, key
    assert sum(p.numel() for p in small.parameters()) == report["params_after"]["total"]
    assert sum(p.numel() for p in dense.parameters()) == report["params_before"]["total"]
    assert (
        report["decoder_kept"] <= 0.7 and report["params_after"]["total"] < report["params_before"]["total"]
    )
    written = sum(f.stat().st_size for f in shrunk.glob("*.safetensors"))
    assert report["file_bytes"] == written < report["file_bytes_before"]
    assert report["verified"] is True
    out = small.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    # evaluation and recovery ran on the smaller model, on the same windows
    ev = report["eval"]
    assert ev["dense_ppl"] == pytest.approx(held_out_ppl(model_dir, text, capsys), rel=1e-5)
    assert ev["recovered_ppl"] == pytest.approx(held_out_ppl(shrunk, text, capsys), rel=1e-5)  # as saved
    assert ev["pruned_ppl"] != pytest.approx(ev["recovered_ppl"], rel=1e-4)  # recovery changed the model
    rec = report["recovery"]
    assert (rec["steps"], rec["tokens"], rec["pruned_kept_zero"]) == (3, 3 * 2 * 32, True)
    assert {"shape.png", "perplexity.png", "recovery_loss.png"} <= set(report["plots"]["files"])


def test_the_card_gives_the_new_shape_and_sizes(shrunk):
    card = (shrunk / "README.md").read_text()
    report = json.loads((shrunk / "pruning_report.json").read_text())
    meta = yaml.safe_load(card.split("---")[1])
    assert "structured-pruning" in meta["tags"] and "mixed" in meta["tags"] and "sparse" not in meta["tags"]
    before, after = report["shape_before"], report["shape_after"]
    assert (
        f"| MLP channels (`intermediate_size`) | {before['intermediate_size']} | {after['intermediate_size']} |"
        in card
    )
    assert (
        f"| parameters | {report['params_before']['total']:,} | {report['params_after']['total']:,} |" in card
    )
    assert f"| safetensors bytes | {report['file_bytes_before']:,} | {report['file_bytes']:,} |" in card
    assert f"| pruned + recovery | {report['eval']['recovered_ppl']:.2f} |" in card
    assert str(shrunk.parent) not in card  # readable names only
    assert "What the zeros buy" not in card


def test_the_saved_config_reproduces_the_run(shrunk):
    cfg = JobConfig.from_yaml(shrunk / "prune_config.yaml")
    assert cfg.structured is not None and cfg.structured.structure == "mixed"
    assert cfg.structured.target_params == 0.7 and cfg.recover.steps == 3
    flat = yaml.safe_load((shrunk / "prune_config.yaml").read_text())
    assert "criterion" not in flat and "sparsity" not in flat  # unstructured keys would mislead


def test_push_verifies_the_shapes_of_a_structured_checkpoint(shrunk, tmp_path):
    report = check_pushable(shrunk)
    assert report["structure"] == "mixed"
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(shrunk), str(bad)], check=True)
    tensors = load_file(bad / "model.safetensors")
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name][:, :-8].contiguous()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"{name} has shape .* but the report says"):
        check_pushable(bad)


def test_recover_takes_a_structured_folder(assets, shrunk, capsys):
    root, _, text = assets
    out = root / "small-rec"
    assert cli.main(["recover", str(shrunk), "--dataset", str(text), "--recover-steps", "2", "--recover-batch-size",
                     "2", "--recover-seq-len", "32", "--output-dir", str(out), "--no-progress"]) == 0  # fmt: skip
    assert "recovered the mixed-pruned model in 2 steps" in capsys.readouterr().out
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["structure"] == "mixed" and report["verified"] and report["recovery"]["steps"] == 2
    a, b = load_file(shrunk / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("structure, extra, check", [
    ("channels", ["--keep-channels", "0.5"], lambda r: r["shape_after"]["intermediate_size"] == 32),
    ("layers", ["--keep-layers", "0.5", "--importance", "block_influence"],
     lambda r: r["shape_after"]["num_hidden_layers"] == 1),
    ("heads", ["--keep-heads", "0.5", "--importance", "magnitude", "--compensate", "none"],
     lambda r: r["shape_after"]["num_attention_heads"] == 2),
])  # fmt: skip
def test_each_structure_reaches_the_shape_it_asks_for(assets, structure, extra, check):
    out = prune(assets, f"s-{structure}", "--structure", structure, *extra)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["structure"] == structure and check(report)


@pytest.mark.parametrize("extra, message", [
    (["--structure", "channels", "--criterion", "wanda"], "criterion 'wanda' applies to unstructured pruning"),
    (["--structure", "heads", "--sparsity", "0.3"], "sparsity 0.3 applies to unstructured pruning"),
    (["--target-params", "0.8"], "target_params applies to structured pruning only: give structure"),
    (["--structure", "channels", "--fsdp"], "structure with fsdp is not supported"),
    (["--structure", "channels", "--save-state-every", "2"], "save_state_every / resume apply to the unstructured"),
    (["--structure", "channels", "--target-params", "1.5"], "target_params 1.5 is outside (0, 1]"),
    (["--structure", "mixed", "--importance", "flap"], "structure 'mixed' compares channels, heads and layers"),
    (["--structure", "channels", "--num-samples", "0"], "needs calibration data but num_samples is 0"),
])  # fmt: skip
def test_settings_that_do_not_apply_are_refused_in_one_line(assets, extra, message, capsys):
    root, model, text = assets
    out = root / "refused"
    code = cli.main(["prune", "--model", str(model), "--dataset", str(text), "--output-dir", str(out),
                     "--no-progress", *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_several_processes_are_refused_before_the_model_loads(assets):
    root, model, text = assets
    out = root / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llm_gradprune",
           "prune", "--model", str(model), "--dataset", str(text), "--structure", "channels",
           "--output-dir", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode != 0
    assert "structure runs in one process, but this launch has 2" in proc.stderr
    assert not out.exists()
