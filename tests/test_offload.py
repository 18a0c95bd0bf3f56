"""`--offload cpu|disk` (issue 25): the layer-wise pass with one block at a time in memory.

Masks and weights are identical to the in-memory run for sparsegpt, lsq, true_sequential, a gradient
recipe (whole-model statistics, then the streamed pass) and structured runs (channels by magnitude read
block by block; mixed after whole-model statistics, with the sequential refit); offload disk reads no whole model when no
whole-model statistic is needed, writes the pruned blocks as they finish, and refuses in one line what
it cannot do.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_gradprune import commands as cli

from .tiny_folder import make_model_folder, make_text_file

pytestmark = pytest.mark.slow

RUNS = {
    "sparsegpt": ["--criterion", "sparsegpt"],
    "sparsegpt-2:4": ["--criterion", "sparsegpt", "--pattern", "2:4"],
    "wanda-lsq": ["--criterion", "wanda", "--reconstruct", "lsq"],
    "true-sequential": ["--criterion", "sparsegpt", "--true-sequential"],
    "fisher-global-lsq": [
        "--criterion",
        "fisher",
        "--scope",
        "global",
        "--reconstruct",
        "lsq",
        "--allow-empty-tensors",
    ],
    "sparsegpt-owl": ["--criterion", "sparsegpt", "--allocation", "owl"],
    "block-refit": [
        "--criterion",
        "wanda",
        "--reconstruct",
        "lsq",
        "--block-steps",
        "2",
        "--block-lr",
        "1e-3",
    ],
    "block-dynamic": "--criterion wanda --pattern 2:4 --block-steps 2 --block-lr 1e-2 --block-mask dynamic".split(),
    "regional": ["--criterion", "regional"],
    "block_fisher": ["--criterion", "block_fisher"],
    # structured: read block by block (no statistics), and after whole-model statistics with a sequential refit
    "structure-magnitude": [
        "--structure",
        "channels",
        "--keep-channels",
        "0.5",
        "--importance",
        "magnitude",
        "--compensate",
        "none",
    ],
    "structure-mixed-lsq": ["--structure", "mixed", "--target-params", "0.7"],
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("offload")
    return root, make_model_folder(root / "model"), make_text_file(root / "t.txt")


def _prune(assets, out: str, *extra: str) -> Path:
    root, model, text = assets
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "8", "--seq-len", "32",
            "--output-dir", str(root / out), "--no-progress", *extra]  # fmt: skip
    assert cli.main(argv) == 0
    return root / out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("run", list(RUNS))
def test_offload_gives_the_in_memory_weights(assets, run):
    ref = _tensors(_prune(assets, f"{run}-none", *RUNS[run]))
    for mode in ("cpu", "disk"):
        out = _prune(assets, f"{run}-{mode}", *RUNS[run], "--offload", mode)
        got = _tensors(out)
        assert sorted(got) == sorted(ref), mode
        for name, t in ref.items():
            assert torch.equal(got[name], t), (mode, name)
        report = json.loads((out / "pruning_report.json").read_text())
        assert report["offload"]["mode"] == mode and report["offload"]["peak_host_bytes"] > 0
        if platform.libc_ver()[0] == "glibc":  # freed tensors go back to the system (offload.py)
            assert report["offload"]["malloc_mmap_threshold"] == 128 * 1024
    assert not list(assets[0].glob(".*partial*"))  # the staged blocks went into the output


def test_disk_reads_no_whole_model_and_writes_a_shard_per_block(assets, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("offload disk loaded the whole model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    out = _prune(assets, "disk-only", "--criterion", "sparsegpt", "--offload", "disk")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.0.self_attn.q_proj.weight"] == "model-00001-of-00003.safetensors"
    assert index["model.layers.1.mlp.down_proj.weight"] == "model-00002-of-00003.safetensors"
    assert index["model.embed_tokens.weight"] == "model-00003-of-00003.safetensors"
    monkeypatch.undo()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    w = loaded.model.layers[1].mlp.down_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--criterion", "fisher"], r"offload 'cpu' applies to layer-wise runs .*not to criterion 'fisher'"),
        (
            ["--criterion", "fisher", "--fsdp"],
            r"offload 'cpu' applies to layer-wise runs .*not to criterion 'fisher'",
        ),
        (
            ["--criterion", "sparsegpt", "--eval"],
            r"eval with offload 'cpu' is not supported: eval scores perplexity",
        ),
        (
            ["--criterion", "sparsegpt", "--recover-steps", "2"],
            r"recover_steps trains the whole model at once",
        ),
    ],
)
def test_what_offload_cannot_do_is_refused_in_one_line(assets, extra, message, capsys):
    root, model, text = assets
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "8", "--seq-len", "32",
            "--output-dir", str(root / "refused"), "--offload", "cpu", *extra]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    import re

    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (root / "refused").exists()


def test_disk_refuses_a_checkpoint_converted_on_load(tmp_path, capsys):
    from .families import BY_NAME
    from .tiny_folder import make_tokenizer

    BY_NAME["mixtral"].build().save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    text = make_text_file(tmp_path / "t.txt")
    argv = ["prune", "--model", str(tmp_path / "moe"), "--dataset", str(text), "--num-samples", "8", "--seq-len",
            "32", "--criterion", "sparsegpt", "--offload", "disk", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "offload 'disk' reads each block's tensors by name" in err and "use --offload cpu" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_two_processes_with_offload_give_the_one_process_weights(assets, mode):
    """Two gloo processes, each holding only the current block (disk: read from the files by every rank,
    written by the main one), each solving its share of the block's tensors: the one-process weights."""
    import os
    import subprocess

    from .tiny_folder import ROOT

    root, model, text = assets
    ref = _tensors(_prune(assets, f"two-ref-{mode}", "--criterion", "sparsegpt", "--true-sequential"))
    out = root / f"two-{mode}"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "prune_llama.py"),
           "--model", str(model), "--dataset", str(text), "--num-samples", "8", "--seq-len", "32", "--criterion",
           "sparsegpt", "--true-sequential", "--offload", mode, "--output-dir", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    got = _tensors(out)
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():  # bit for bit: every rank sums its tensors' Hessians in one process's order
        assert torch.equal(got[name], t), name
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["calibration"]["processes"] == 2 and report["offload"]["mode"] == mode
    assert not list(root.glob(f".two-{mode}.partial*"))


def _launch(assets, out: str, *extra: str) -> subprocess.CompletedProcess:
    from .tiny_folder import ROOT

    root, model, text = assets
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "prune_llama.py"),
           "--model", str(model), "--dataset", str(text), "--num-samples", "8", "--seq-len", "32",
           "--output-dir", str(root / out), "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


FISHER_GLOBAL_LSQ = "--criterion fisher --scope global --allow-empty-tensors --reconstruct lsq".split()


@pytest.mark.parametrize("family", [None, "gemma2"])
def test_gradient_statistics_on_fsdp_shards_feed_the_streamed_pass(assets, family, tmp_path):
    """Also on Gemma2 (sliding and full attention layers, each block replayed with its own call). Two processes, --fsdp --offload disk: the gradients are folded on FSDP2 row shards and the global
    scope's counts are taken there; then every rank reads whole blocks from the files, gathers one
    block's rows of the statistics at a time and solves its share (lsq). The masks are one process's
    in-memory masks, every tensor has the same number of zeros, and the weights agree (the sharded
    pass sums each micro-batch's pieces, so a last bit may differ)."""
    if family is not None:
        from .families import BY_NAME
        from .tiny_folder import make_tokenizer

        BY_NAME[family].build().save_pretrained(tmp_path / family)
        make_tokenizer().save_pretrained(tmp_path / family)
        assets = (tmp_path, tmp_path / family, assets[2])
    ref = _tensors(_prune(assets, "fsdp-ref", *FISHER_GLOBAL_LSQ))
    proc = _launch(assets, "fsdp-disk", *FISHER_GLOBAL_LSQ, "--fsdp", "--offload", "disk")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    root = assets[0]
    got = _tensors(root / "fsdp-disk")
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(got[name] == 0, t == 0), name
        torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-6)
    report = json.loads((root / "fsdp-disk" / "pruning_report.json").read_text())
    assert report["calibration"]["sharding"] == "fsdp2" and report["calibration"]["processes"] == 2
    assert report["mode"]["executor"] == "layer_wise" and report["offload"]["mode"] == "disk"
    assert report["scope"] == "global" and report["mode"]["reconstruct"] == "lsq"
    assert report["zero_weights"] == report["target_weights"] // 2
    assert not list(root.glob(".fsdp-disk.partial*"))
    shutil.rmtree(root / "fsdp-ref")
    shutil.rmtree(root / "fsdp-disk")


def test_dry_run_over_two_processes_plans_the_fsdp_path_once(assets):
    proc = _launch(assets, "fsdp-dry", *FISHER_GLOBAL_LSQ, "--fsdp", "--offload", "disk", "--dry-run")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("dry run of") == 1  # one process prints the plan
    assert "offload disk; 2 process(es), FSDP" in proc.stdout and "<- this run" in proc.stdout
    assert not (assets[0] / "fsdp-dry").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        ([*FISHER_GLOBAL_LSQ, "--offload", "cpu"], "offload 'cpu' with fsdp is not supported in layer-wise mode: "
         "after the sharded statistics each rank reads the blocks whole from the model's files: use --offload disk"),
        (["--criterion", "sparsegpt", "--offload", "disk"], "fsdp shards the whole-model statistics pass, and "
         "criterion 'sparsegpt' reads no whole-model statistics and selects in no global scope: launch without --fsdp"),
    ],
)  # fmt: skip
def test_layer_wise_with_fsdp_refuses_what_it_cannot_shard_in_one_line(assets, extra, message):
    out = f"fsdp-refused-{len(extra)}"
    proc = _launch(assets, out, *extra, "--fsdp")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("llm-gradprune: error:")]
    assert lines and all(message in ln for ln in lines), proc.stderr[-2000:]
    assert not (assets[0] / out).exists()


def test_a_run_that_cannot_fit_is_refused_when_planned_naming_offload(assets, monkeypatch, capsys):
    """The real run checks the memory model before loading its model: with 266 kB free here the in-memory
    sparsegpt run cannot fit, and the one line names an offload mode that would."""
    from transformers import AutoModelForCausalLM

    from llm_gradprune.job import fits

    monkeypatch.setattr(
        fits, "available_memory", lambda device: (266e3, None)
    )  # in memory ~255 kB, disk ~238 kB, 90% usable
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    root, model, text = assets
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "8", "--seq-len", "32",
            "--criterion", "sparsegpt", "--output-dir", str(root / "too-big")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offload 'none' needs about" in err[0] and "use --offload" in err[0], err
    assert not (root / "too-big").exists()


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mixtral", "gpt2"])
def test_offloaded_blocks_replay_with_their_own_calls_on_other_families(family):
    """The stubbed capture still records each block's own call (Gemma's sliding and full layers), and
    experts and Conv1D blocks prune as in memory: sparsegpt with offload cpu gives the in-memory weights."""
    from llm_gradprune import PruneConfig, prune_
    from llm_gradprune.offload import BlockStore
    from llm_gradprune.targets import find_targets

    from .families import BY_NAME

    out = []
    for store in (None, BlockStore("cpu", "cpu")):
        model = BY_NAME[family].build()
        g = torch.Generator().manual_seed(1)
        batches = list(torch.randint(0, model.config.vocab_size, (4, 32), generator=g).split(2))
        prune_(model, batches, PruneConfig(progress=False, criterion="sparsegpt"), offload=store)
        out.append({n: t.weight.detach().clone() for n, t in find_targets(model).items()})
    for name, w in out[0].items():
        assert torch.equal(w, out[1][name]), name
