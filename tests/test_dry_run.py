"""`prune --dry-run` and the memory model: the plan is printed without reading a weight, its targets are
the real model's, its bytes are the hand-computed ones, and a run that cannot fit is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llm_gradprune import commands as cli
from llm_gradprune import memory
from llm_gradprune.errors import ConfigError
from llm_gradprune.plan import target_summary
from llm_gradprune.targets import find_targets

from .families import BY_NAME
from .tiny_folder import make_model_folder, make_text_file, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    moe = root / "moe"
    BY_NAME["qwen3_moe"].build().save_pretrained(moe)
    make_tokenizer().save_pretrained(moe)
    return {"dense": make_model_folder(root / "dense"), "deep": make_model_folder(root / "deep", layers=40),
            "moe": moe, "text": make_text_file(root / "text.txt"), "root": root}  # fmt: skip


def dry(folders, *flags: str, model: str = "dense") -> list[str]:
    return ["prune", "--model", str(folders[model]), "--dataset", str(folders["text"]), "--num-samples", "8",
            "--seq-len", "32", "--output-dir", str(folders["root"] / "out"), "--no-progress", "--dry-run", *flags]  # fmt: skip


def refuse_weights(mp: pytest.MonkeyPatch) -> None:
    """Any weight read fails the test."""
    import safetensors.torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was loaded")

    mp.setattr(safetensors.torch, "load_file", refuse)
    mp.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(("model", "flags"), [("dense", ["--criterion", "sparsegpt"]),
                                              ("moe", ["--criterion", "fisher", "--reconstruct", "lsq"]),
                                              ("moe", ["--criterion", "fisher", "--scope", "global", "--reconstruct",
                                                       "lsq", "--allow-empty-tensors"])])  # fmt: skip
def test_dry_run_prints_the_real_targets_per_kind_and_loads_no_weight(folders, capsys, model, flags):
    with pytest.MonkeyPatch.context() as mp:
        refuse_weights(mp)
        assert cli.main(dry(folders, *flags, model=model)) == 0
    out = capsys.readouterr().out
    from llm_gradprune.models import load_model

    loaded = load_model(str(folders[model]))[0]  # the real model, with its weights, after the dry run
    targets_line = next(line for line in out.splitlines() if line.startswith("targets:"))
    kinds = target_summary(loaded, find_targets(loaded))["per_kind"]
    for kind, v in kinds.items():
        assert f"{kind} {v['matrices']} matrices ({v['weights']:,} weights)" in targets_line
    assert "statistics: whole model: " + ("none" if model == "dense" else "grad_sq_mean") in out
    assert "offload none" in out and "offload cpu" in out and "offload disk" in out
    assert "fits: yes" in out and "time: about" in out


def test_dry_run_refuses_a_run_that_cannot_fit_in_one_line_naming_offload(folders, monkeypatch, capsys):
    from llm_gradprune.job import dry_run

    # 40 blocks: the whole model is ~3 MB, one block and the inputs well under 1 MB
    monkeypatch.setattr(dry_run, "available_memory", lambda device: (1e6, None))
    assert cli.main(dry(folders, "--criterion", "sparsegpt", model="deep")) == 2
    out, err = capsys.readouterr()
    assert "memory (predicted peaks" in out  # the plan is printed too
    assert len(err.strip().splitlines()) == 1 and "use --offload disk" in err, err


@pytest.mark.parametrize(("flags", "says"), [
    (["--criterion", "nope"], "criterion"),
    (["--criterion", "magnitude", "--offload", "cpu"], "offload 'cpu' applies to layer-wise runs"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
])  # fmt: skip
def test_bad_settings_still_give_the_usual_one_line_error(folders, capsys, flags, says):
    argv = dry(folders)
    if flags[0] == "--model":
        argv[argv.index("--model") + 1] = flags[1]
        flags = []
    assert cli.main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


# -- the memory model against numbers worked out by hand -------------------------------------------------
TINY = memory.facts_shape("tiny", 2, 8, 16, 2, 1, 10, tied=True)
SETTINGS = memory.RunSettings(dtype_bytes=2, samples=4, seq_len=3, batch_size=1)


def test_tiny_shape_counts():
    # per block: q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16 = 576 targets + 2 norms of 8
    assert TINY.blocks[0].targets == 576 and TINY.blocks[0].params == 592
    assert TINY.params == 2 * 592 + 10 * 8 + 8  # tied embedding once, final norm
    # q/k/v share one 8x8 fp32 Hessian, o one, gate/up one, down one 16x16: 4 (64 + 64 + 64 + 256)
    assert TINY.blocks[0].hessian_bytes() == 1792
    assert TINY.blocks[0].hessian_bytes(true_sequential=True) == 1024
    # inputs 8 + 8 + 8 + 2 x 16, outputs 8 + 4 + 4 + 8 + 16 + 16 + 8, two norm inputs 16
    assert TINY.blocks[0].act_per_token(8) == 136


def test_tiny_peaks_per_offload_mode():
    model, block, forward = 2 * 1272, 2 * 592, 2 * 3 * 136  # bytes: bf16 weights, one 3-token micro-batch
    inputs, hessians = 4 * 3 * 8 * 2, 1792
    none, cpu, disk = (memory.predict(TINY, SETTINGS, m) for m in memory.OFFLOADS)
    assert (none.host, none.device) == (model, model + hessians + inputs + forward)
    assert (cpu.host, cpu.device) == (model, block + hessians + inputs + forward)
    assert (disk.host, disk.device) == (2 * block, block + hessians + inputs + forward)
    assert disk.host_terms == {"block": block, "pruned block": block}
    off = memory.predict(
        TINY, memory.RunSettings(dtype_bytes=2, samples=4, seq_len=3, offload_inputs=True), "cpu"
    )
    assert off.host == model + inputs and off.device == block + hessians + forward


def test_a_shape_read_off_the_meta_model_equals_the_one_from_config_facts():
    from transformers import AutoConfig

    from llm_gradprune.job.meta_model import meta_model, model_shape

    from .conftest import make_tiny_llama

    config = AutoConfig.for_model(**make_tiny_llama().config.to_dict())
    model = meta_model(config, "float32")
    read = model_shape(model, find_targets(model), "tiny")
    facts = memory.facts_shape("tiny", 2, 32, 64, 4, 2, 128, tied=True)
    assert read.params == facts.params and read.targets == facts.targets
    for mode in memory.OFFLOADS:
        assert memory.predict(read, SETTINGS, mode).device == memory.predict(facts, SETTINGS, mode).device


def test_check_fits_names_the_option_that_makes_it_fit():
    s, gb = memory.SHAPES["llama3-70b"], 1e9
    layer_wise = memory.RunSettings(dtype_bytes=2, samples=128, seq_len=2048)
    with pytest.raises(ConfigError, match=r"use --offload cpu") as err:
        memory.check_fits(s, layer_wise, "none", 1000 * gb, 80 * gb)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"use --offload disk"):
        memory.check_fits(s, layer_wise, "none", 64 * gb, 80 * gb)
    assert memory.check_fits(s, layer_wise, "cpu", 1000 * gb, 80 * gb).device < 20 * gb
    fisher = memory.RunSettings(dtype_bytes=4, seq_len=2048, layer_wise=False, weight_stats=1, backward=True)
    with pytest.raises(ConfigError, match=r"use stats_device: cpu"):
        memory.check_fits(memory.SHAPES["llama2-7b"], fisher, "none", 1000 * gb, 60 * gb)
    # 70B with fisher: 141 GB of weights and 274 GB of statistics over 8 GPUs, checkpointed activations
    fisher = memory.RunSettings(seq_len=2048, weight_stats=1, backward=True, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=r"use more processes: --fsdp over 8 .* with --offload disk"):
        memory.check_fits(s, fisher, "cpu", 2000 * gb, 80 * gb)


def test_layer_wise_after_fsdp_statistics_holds_a_shard_of_the_statistics():
    """--fsdp --offload disk in layer-wise mode: during the streamed pass each of 8 ranks keeps its
    eighth of the whole-model statistics, plus one block's statistics whole (the sharded model's rows
    are freed before the pass)."""
    s = memory.SHAPES["llama3-70b"]
    r = memory.RunSettings(seq_len=2048, weight_stats=1, backward=True, gradient_checkpointing=True)
    one = memory.phases(s, r, "disk")["layer-wise"]
    eight = memory.phases(s, replace(r, fsdp=True, processes=8), "disk")["layer-wise"]
    assert set(one[1]) == set(eight[1])
    assert eight[0]["statistics"] == pytest.approx(one[0]["statistics"] / 8)
    assert eight[1]["block statistics"] == one[1]["block statistics"] > 0


def test_memory_model_script_prints_and_writes_json(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_model.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(memory.BIG) <= set(result["offload"])
    assert "Llama-3.1-405B" in proc.stdout


def test_the_time_estimate_counts_the_block_refit_passes():
    """With a probe of 1 s per block forward over one micro-batch and a free solve: sparsegpt is 2 passes
    (statistics, outputs) over 4 micro-batches per block; 2 refit steps add the dense outputs, 3 x 2
    forward-and-backward passes and the loss after (8 more passes), and a step per micro-batch the loss
    before (9); block_fisher's backward through each block counts as 3."""
    import torch

    from llm_gradprune.config import JobConfig
    from llm_gradprune.job.dry_run import time_estimate
    from llm_gradprune.job.fits import run_settings, statistics_plan

    def seconds(**prune) -> str:
        cfg = JobConfig.from_flat({"criterion": "sparsegpt", "num_samples": 4, "progress": False, **prune})
        plan = statistics_plan(cfg, torch.nn.Linear(8, 8, bias=False))
        settings = run_settings(cfg, plan, 1, False, torch.device("cpu"))
        text = time_estimate(cfg, TINY, settings, (1.0, 0.0, (8, 8), plan))
        return text.split("pruning ")[1].split(")")[0]

    blocks = len(TINY.blocks)
    assert seconds() == f"{blocks * 2 * 4:.1f} s"
    assert seconds(block_steps=2) == f"{blocks * (2 + 8) * 4:.1f} s"
    assert seconds(block_steps=2, block_batch=1) == f"{blocks * (2 + 9) * 4:.1f} s"
    # a block-local criterion: one pass on the dense inputs and a backward through the block (3 passes)
    assert seconds(criterion="block_fisher") == f"{blocks * (1 + 3) * 4:.1f} s"
    assert seconds(criterion="block_fisher", sequential=True) == f"{blocks * (2 + 3) * 4:.1f} s"
