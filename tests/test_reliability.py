"""Atomic outputs under SIGKILL, safe defaults (no token leaks, safetensors only) and determinism."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_gradprune import commands as cli
from llm_gradprune.calibration.data import TextSource, load_samples, token_hash
from llm_gradprune.config import JobConfig
from llm_gradprune.io.atomic import swap_dirs
from llm_gradprune.job import prune_job

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
    # No previous output: killed after the weights are written, before verification -> no output at
    # all, and the hidden partial folder does not load (its config.json is parked until verified).
    kill_when_paused(start_cli(_args(assets, out), "output-write:1"))
    assert not out.exists()
    (partial,) = [
        p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")
    ]  # the killed run's lock stays too
    assert partial.name.startswith(".out.partial-") and (partial / "model.safetensors").exists()
    with pytest.raises((OSError, ValueError)):  # no config.json: not a model folder
        AutoModelForCausalLM.from_pretrained(partial)

    assert cli.main(_args(assets, out)) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the dead run's leftover is cleaned up
    before = _contents(out)
    # Killed mid-write of a replacement: the previous output is untouched and still loads.
    kill_when_paused(start_cli(_args(assets, out, "--overwrite", "--sparsity", "0.75"), "output-write:1"))
    assert _contents(out) == before
    _loads_with_sparsity(out, 0.5)

    # Killed while installing the verified replacement. Linux swaps the folders atomically, so `out` is
    # the complete new checkpoint (the old one waits in a hidden folder for removal); elsewhere the old
    # one is moved aside first, so `out` is briefly absent but never half-written.
    kill_when_paused(start_cli(_args(assets, out, "--overwrite", "--sparsity", "0.75"), "output-install:1"))
    if swap_dirs_works(tmp_path):
        _loads_with_sparsity(out, 0.75)
        (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    else:
        assert not out.exists()
        (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert _contents(aside) == before
    _loads_with_sparsity(aside, 0.5)

    # A later run installs normally and removes the leftovers.
    assert cli.main(_args(assets, out, "--overwrite", "--sparsity", "0.75")) == 0
    _loads_with_sparsity(out, 0.75)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def swap_dirs_works(folder):
    a, b = folder / "swap-a", folder / "swap-b"
    a.mkdir(), b.mkdir()
    ok = swap_dirs(a, b)
    a.rmdir(), b.rmdir()
    return ok


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


@pytest.mark.parametrize("flag,expected", [([], False), (["--trust-remote-code"], True)])
def test_remote_code_and_pickles_only_when_asked(assets, tmp_path, monkeypatch, flag, expected):
    """Model code from the Hub runs only with --trust-remote-code, and weights load from safetensors only
    (a .bin-only folder is refused: tests/test_bad_input.py row model-only-pickled-bin): what the loader
    is really called with, not just the config's default."""
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, **kw):
            seen.append((klass.__name__, kw.get("trust_remote_code"), kw.get("use_safetensors")))
            return _real(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    assert cli.main(_args(assets, tmp_path / "out", *flag)) == 0
    assert {name for name, _, _ in seen} >= {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert all(trc is expected for _, trc, _ in seen)
    assert [s for n, _, s in seen if n == "AutoModelForCausalLM"] == [True]


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
    cfg = JobConfig(
        model=str(assets["model"]), dataset=str(assets["text"]), num_samples=4, seq_len=16, seed=5
    )
    from transformers import AutoTokenizer

    blocks = load_samples(
        TextSource(cfg.dataset, seed=cfg.seed), AutoTokenizer.from_pretrained(assets["model"]), 4, 16
    )
    assert ra["calibration"]["token_sha256"] == rb["calibration"]["token_sha256"] == token_hash(blocks)
    # another seed reads other text: another hash (so the hash does tell runs apart)
    assert cli.main(_args(assets, c, "--seed", "6")) == 0
    rc = json.loads((c / "pruning_report.json").read_text())
    assert rc["seed"] == 6 and rc["calibration"]["token_sha256"] != ra["calibration"]["token_sha256"]


def test_run_prune_library_path_matches_cli(assets, tmp_path):
    """The same config through the library call gives the CLI's bytes (no hidden state in the shell)."""
    assert cli.main(_args(assets, tmp_path / "cli")) == 0
    cfg = JobConfig.from_flat({"model": str(assets["model"]), "dataset": str(assets["text"]), "num_samples": 4,
                               "seq_len": 16, "output_dir": str(tmp_path / "lib"), "progress": False})  # fmt: skip
    prune_job(cfg)
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (
        tmp_path / "lib" / "model.safetensors"
    ).read_bytes()


def test_checkpoint_whose_zeros_differ_from_the_report_is_not_installed(tmp_path):
    from llm_gradprune import prune_
    from llm_gradprune.io.checkpoint import VerificationError, save_pruned

    from .conftest import make_tiny_llama

    model = make_tiny_llama()
    cfg = JobConfig.from_flat({"criterion": "magnitude", "num_samples": 0, "output_dir": str(tmp_path / "out"),
                               "progress": False})  # fmt: skip
    report = prune_(model, None, cfg.prune, return_masks=False).report
    name = next(iter(report["per_tensor"]))
    report["per_tensor"][name]["zeros"] += 1  # the report claims one zero more than was written
    with pytest.raises(VerificationError, match=f"{name}: .* zeros written but the report says"):
        save_pruned(model, None, report, tmp_path / "out", settings=cfg.to_flat())
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder remains


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_count_streams_in_chunks_that_split_tensors(tmp_path, dtype):
    from safetensors.torch import save_file

    from llm_gradprune.io.checkpoint import count_zeros

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(37, 53, generator=g).to(dtype) for i in range(3)}
    tensors["t1"][torch.rand(37, 53, generator=g) < 0.4] = 0
    tensors["t2"][0, :7] = -0.0  # negative zero is a zero
    save_file(tensors, str(tmp_path / "model.safetensors"))
    want = {k: int((v == 0).sum()) for k, v in tensors.items()}
    for chunk in (6, 100, 1 << 20):  # elements split across reads, and one read per tensor
        assert count_zeros(tmp_path, ["t0", "t1", "t2"], chunk_bytes=chunk) == want


def test_a_selection_that_zeroes_whole_tensors_is_refused_unless_allowed(assets, tmp_path, capsys):
    """wanda's activation-scaled scores are not comparable across layers: a global threshold empties whole
    tensors (the README's 6,235 perplexity). Refused, one line naming them, nothing written; allowed on
    request, with the warning and the tensors in the report."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(_args(assets, out, "--criterion", "wanda", "--scope", "global", "--sparsity", "0.7")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("llm-gradprune: warning: criterion 'wanda' scales its scores with each layer's")
    assert len(err) == 2 and err[1].startswith(
        "llm-gradprune: error: this selection would zero every weight of"
    )
    assert "pass --allow-empty-tensors to accept it" in err[1] and "model.layers." in err[1]
    assert list(tmp_path.iterdir()) == []
    assert cli.main(_args(assets, out, "--criterion", "wanda", "--scope", "global", "--sparsity", "0.7",
                          "--allow-empty-tensors")) == 0  # fmt: skip
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["empty_tensors"] and all(report["per_tensor"][n]["zeros"] == report["per_tensor"][n]["numel"]
                                           for n in report["empty_tensors"])  # fmt: skip
    assert any("entirely zero" in n for n in report["notes"])


def test_output_folder_follows_the_umask(assets, tmp_path):
    """Others on a shared machine can read the checkpoint when the umask lets them (022 -> 755/644)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert cli.main(_args(assets, tmp_path / "out")) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p.name  # group and others may read it
    old = os.umask(0o077)
    try:
        assert cli.main(_args(assets, tmp_path / "private")) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700


def test_prune_eval_prints_both_perplexities(assets, tmp_path, capsys):
    assert cli.main(_args(assets, tmp_path / "out", "--eval", "--eval-num-samples", "2")) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    ev = report["eval"]
    line = next(x for x in out.splitlines() if x.startswith("held-out perplexity:"))
    assert line == (f"held-out perplexity: dense {ev['dense_ppl']:.3f}, pruned {ev['pruned_ppl']:.3f} "
                    f"(2 windows, {ev['tokens']:,} tokens of test)")  # fmt: skip


def test_local_data_files_leave_nothing_in_the_datasets_cache(assets, tmp_path, monkeypatch):
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    for suffix in (".jsonl", ".csv"):
        data = tmp_path / f"d{suffix}"
        lines = assets["text"].read_text().splitlines()
        if suffix == ".jsonl":
            data.write_text("\n".join(json.dumps({"text": x}) for x in lines))
        else:
            data.write_text("text\n" + "\n".join(lines))
        args = _args(assets, tmp_path / f"out{suffix}")
        args[args.index("--dataset") + 1] = str(data)
        assert cli.main(args) == 0
    assert not cache.exists() or not any(cache.rglob("*"))
