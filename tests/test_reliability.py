"""Atomic outputs under SIGKILL, safe defaults (no token leaks, safetensors only) and determinism."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from llm_gradprune import cli
from llm_gradprune.config import PruneConfig
from llm_gradprune.data import load_blocks, token_hash
from llm_gradprune.pipeline import run_prune

from .tiny_folder import kill_when_paused, make_model_folder, make_text_file, start_cli


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": make_model_folder(root / "model"), "text": make_text_file(root / "t.txt")}


def _args(assets, out, *extra):
    return ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--num-samples", "4",
            "--seq-len", "16", "--output-dir", str(out), "--no-progress", *extra]  # fmt: skip


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _loads_with_sparsity(folder, sparsity):
    report = json.loads((folder / "pruning_report.json").read_text())
    assert report["verified"] and report["target_sparsity"] == sparsity
    params = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    for name, info in report["per_tensor"].items():
        assert int((params[name] == 0).sum()) == info["zeros"]


@pytest.mark.slow
def test_killed_save_leaves_previous_output_or_none(assets, tmp_path):
    out = tmp_path / "out"
    # No previous output: killed after the weights are written, before verification -> no output at all.
    kill_when_paused(start_cli(_args(assets, out), "output-write:1"))
    assert not out.exists()
    partial = [p.name for p in tmp_path.iterdir()]
    assert partial and all(n.startswith(".out.partial-") for n in partial)  # hidden, never `out`

    assert cli.main(_args(assets, out)) == 0
    before = _contents(out)
    # Killed mid-write of a replacement: the previous output is untouched and still loads.
    kill_when_paused(start_cli(_args(assets, out, "--overwrite", "--sparsity", "0.75"), "output-write:1"))
    assert _contents(out) == before
    _loads_with_sparsity(out, 0.5)

    # Killed between moving the old output aside and renaming the new one in: `out` is absent (never
    # half-written) and the previous output is intact, beside it, under a hidden name.
    kill_when_paused(start_cli(_args(assets, out, "--overwrite", "--sparsity", "0.75"), "output-install:1"))
    assert not out.exists()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert _contents(aside) == before
    _loads_with_sparsity(aside, 0.5)

    # A later run installs the new output normally.
    assert cli.main(_args(assets, out, "--overwrite", "--sparsity", "0.75")) == 0
    _loads_with_sparsity(out, 0.75)


def test_hub_token_never_reaches_report_config_card_or_logs(assets, tmp_path, monkeypatch, capfd):
    secret = "hf_reliabilityTestSecret0123456789abcd"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    assert cli.main(_args(assets, tmp_path / "out")) == 0
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    files = list((tmp_path / "out").rglob("*"))
    assert {"pruning_report.json", "prune_config.yaml", "README.md"} <= {p.name for p in files}
    for p in files:
        assert secret.encode() not in p.read_bytes(), p.name


def test_safe_defaults():
    cfg = PruneConfig()
    assert cfg.trust_remote_code is False  # remote code only when the user passes --trust-remote-code
    # use_safetensors: tests/test_bad_input.py::...[model-only-pickled-bin] shows a .bin-only model refused


def test_same_seed_gives_byte_identical_checkpoints(assets, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out in (a, b):
        assert cli.main(_args(assets, out, "--seed", "5")) == 0
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == ["model.safetensors"]
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ra, rb = (json.loads((x / "pruning_report.json").read_text()) for x in (a, b))
    assert ra["seed"] == 5 and ra["per_tensor"] == rb["per_tensor"]
    # the recorded hash is the sha256 of exactly the calibration tokens used
    cfg = PruneConfig(
        model=str(assets["model"]), dataset=str(assets["text"]), num_samples=4, seq_len=16, seed=5
    )
    from transformers import AutoTokenizer

    blocks = load_blocks(cfg, AutoTokenizer.from_pretrained(assets["model"]))
    assert ra["calibration"]["token_sha256"] == rb["calibration"]["token_sha256"] == token_hash(blocks)
    # another seed reads other text: another hash (so the hash does tell runs apart)
    assert cli.main(_args(assets, c, "--seed", "6")) == 0
    rc = json.loads((c / "pruning_report.json").read_text())
    assert rc["seed"] == 6 and rc["calibration"]["token_sha256"] != ra["calibration"]["token_sha256"]


def test_run_prune_library_path_matches_cli(assets, tmp_path):
    """The same config through the library call gives the CLI's bytes (no hidden state in the shell)."""
    assert cli.main(_args(assets, tmp_path / "cli")) == 0
    cfg = PruneConfig(model=str(assets["model"]), dataset=str(assets["text"]), num_samples=4, seq_len=16,
                      output_dir=str(tmp_path / "lib"), progress=False)  # fmt: skip
    run_prune(cfg)
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (
        tmp_path / "lib" / "model.safetensors"
    ).read_bytes()
