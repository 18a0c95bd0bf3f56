"""Masked recovery training on a tiny random Llama: pruned weights stay exactly zero (also with two
processes), kept weights move and the loss falls, 2:4 stays 2:4, LoRA merged through the mask keeps the
zero set, the distillation loss is zero for a student equal to its teacher, and a killed run resumes to
bit-identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.recovery.config import RecoverConfig
from llm_gradprune.recovery.losses import distill_kl
from llm_gradprune.recovery.state import RecoverState
from llm_gradprune.recovery.trainer import recover_, warmup_cosine
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def pruned(pattern: str | None = None, seed: int = 0):
    model = make_tiny_llama(seed=seed)
    kw = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    prune_(model, list(make_blocks(4, 16).split(1)), PruneConfig(criterion="fisher", progress=False, **kw))
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach().clone() for n, m in find_targets(model).items()}


def train_batches(n: int = 4) -> list[torch.Tensor]:
    return list(make_blocks(4 * n, 16, seed=5).split(4))


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_pruned_weights_stay_exactly_zero_kept_ones_move_and_the_loss_falls(pattern):
    model = pruned(pattern)
    before = weights(model)
    cfg = RecoverConfig(steps=16, lr=1e-2, warmup=0.1, batch_size=4, weight_decay=0.1)
    model, rep = recover_(model, train_batches(2), cfg, progress=False)
    after = weights(model)
    moved = 0
    for name, w in after.items():
        zero = before[name] == 0
        assert torch.equal(w[zero], torch.zeros_like(w[zero])), name  # exactly, weight decay included
        moved += int((w[~zero] != before[name][~zero]).sum())
        if pattern:
            assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert moved > 0.9 * sum(int((b != 0).sum()) for b in before.values())
    losses = [e["loss"] for e in rep["log"] if "loss" in e]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2  # two batches, seen 8 times: they are learnt
    assert rep["pruned_kept_zero"] and rep["steps"] == 16 and rep["trained_tensors"] == 14


def test_lora_merged_through_the_mask_keeps_the_zero_set():
    pytest.importorskip("peft")
    model = pruned()
    before = weights(model)
    cfg = RecoverConfig(steps=6, lr=1e-2, lora_r=4, batch_size=4)
    model, rep = recover_(model, train_batches(), cfg, progress=False)
    assert not any("lora" in n for n, _ in model.named_parameters())  # a plain model again
    after = weights(model)
    changed = 0
    for name, w in after.items():
        assert torch.equal(w == 0, before[name] == 0), name  # the same zero set, exactly
        changed += int((w != before[name]).sum())
    assert changed > 0 and rep["lora_r"] == 4 and rep["trained_weights"] == sum(
        4 * (w.shape[0] + w.shape[1]) for w in before.values())  # fmt: skip


def test_distillation_loss_is_zero_for_a_student_equal_to_its_teacher():
    logits = torch.randn(2, 5, 11)
    assert float(distill_kl(logits, logits.clone())) == 0.0
    other = logits + torch.randn_like(logits)
    assert float(distill_kl(logits, other)) > 0
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(distill_kl(x, logits), x)
    assert float(grad.abs().max()) < 1e-7  # nothing to learn from an equal teacher (fp32 rounding left)
    # in the loop: a student equal to its teacher starts at KL exactly 0
    _, rep = recover_(pruned(), train_batches(2), RecoverConfig(steps=1, lr=1e-2, distill_alpha=1.0),
                      teacher=pruned(), progress=False)  # fmt: skip
    assert rep["log"][0]["kl"] == 0.0 and rep["log"][0]["lm"] > 4


def test_schedule_warms_up_then_decays_to_zero():
    f = warmup_cosine(10, 2)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


class Crash(Exception):
    pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kill_and_resume_gives_bit_identical_weights(tmp_path, monkeypatch, dtype):
    cfg = RecoverConfig(steps=7, lr=3e-3, save_state_every=2, batch_size=4)

    def pruned():  # bf16: the state holds the fp32 master weights, which the model is rounded from
        return globals()["pruned"]().to(dtype)

    ref, ref_rep = recover_(pruned(), train_batches(), cfg, progress=False)
    ident = {"run": "t"}
    import llm_gradprune.recovery.trainer as trainer

    real = trainer.lm_and_distill_loss
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # inside step 6: the state of step 4 is on disk
            raise Crash
        return real(*a, **k)

    monkeypatch.setattr(trainer, "lm_and_distill_loss", crashing)
    with pytest.raises(Crash):
        recover_(
            pruned(),
            train_batches(),
            cfg,
            state=RecoverState(tmp_path / "s", 2, False, ident),
            progress=False,
        )
    monkeypatch.setattr(trainer, "lm_and_distill_loss", real)
    state = RecoverState(tmp_path / "s", 2, True, ident)
    got, rep = recover_(pruned(), train_batches(), cfg, state=state, progress=False)
    assert rep["resumed_from_step"] == 4
    assert rep["tokens"] == ref_rep["tokens"] == 7 * 4 * 16  # the steps before the resume count too
    for name, w in weights(ref).items():
        assert torch.equal(w, weights(got)[name]), name
        assert w.dtype == dtype


def test_bf16_weights_train_through_fp32_masters(monkeypatch):
    """At lr 2e-5 every AdamW update (about lr) is below half a bf16 step of the tiny model's weights
    (~6e-5 at |w| = 0.02): stepping the bf16 weights themselves rounds nearly all of it away, the fp32
    masters add it up and the rounded model moves."""
    import llm_gradprune.recovery.trainer as trainer

    cfg = RecoverConfig(steps=16, lr=2e-5, warmup=0.0, batch_size=4, max_grad_norm=0.0)

    def moved_share(model) -> tuple[float, dict]:
        before = weights(model)
        model, rep = recover_(model, train_batches(2), cfg, progress=False)
        moved = kept = 0
        for name, w in weights(model).items():
            assert w.dtype == torch.bfloat16
            zero = before[name] == 0
            assert torch.equal(w[zero], torch.zeros_like(w[zero])), name
            big = ~zero & (before[name].abs() > 0.01)  # where a step of 2e-5 is under half a bf16 step
            moved += int((w[big] != before[name][big]).sum())
            kept += int(big.sum())
        return moved / kept, rep

    share, rep = moved_share(pruned().to(torch.bfloat16))
    assert rep["master_weights"] == "fp32" and rep["pruned_kept_zero"]
    monkeypatch.setattr(trainer, "fp32_masters", lambda *a: None)  # what training without masters did
    share_without, rep_without = moved_share(pruned().to(torch.bfloat16))
    assert rep_without["master_weights"] is None
    assert share > 0.5 and share_without < 0.1, (share, share_without)
    _, rep32 = recover_(pruned(), train_batches(2), cfg, progress=False)
    assert rep32["master_weights"] is None  # fp32 weights are stepped directly


@pytest.mark.slow
def test_two_processes_keep_pruned_weights_zero_and_replicas_equal(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tests.recovery_worker", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["zeros_kept"] and result["replicas_equal"] and result["moved"] > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_prune_with_a_recover_section_end_to_end(tmp_path):
    """The job: prune, then recover (a `recover:` section), one verified checkpoint with the training log;
    the held-out perplexity before pruning, after pruning and after recovery on the same windows."""
    import json

    from llm_gradprune import commands as cli

    from .tiny_folder import make_model_folder, make_text_file

    model_dir, text = make_model_folder(tmp_path / "m"), make_text_file(tmp_path / "t.txt", lines=400)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("criterion: fisher\nsparsity: 0.6\nrecover:\n  steps: 6\n  lr: 0.003\n  batch_size: 2\n")
    out = tmp_path / "out"
    argv = ["prune", "--config", str(cfg), "--model", str(model_dir), "--dataset", str(text), "--num-samples", "4",
            "--seq-len", "16", "--eval", "--eval-num-samples", "4", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    rec = report["recovery"]
    assert rec["steps"] == 6 and rec["pruned_kept_zero"] and len([e for e in rec["log"] if "loss" in e]) == 6
    assert report["verified"] and report["zero_weights"] >= report["masked_weights"]
    ev = report["eval"]
    assert ev["recovered_ppl"] != ev["pruned_ppl"] and ev["dense_ppl"] > 1
    assert "| pruned + recovery |" in (out / "README.md").read_text()


def test_recover_command_on_a_pruned_folder(tmp_path, capsys):
    import json

    from llm_gradprune import commands as cli

    from .tiny_folder import make_model_folder, make_text_file

    model_dir, text = make_model_folder(tmp_path / "m"), make_text_file(tmp_path / "t.txt", lines=400)
    pruned_dir, out = tmp_path / "pruned", tmp_path / "recovered"
    common = ["--dataset", str(text), "--no-progress"]
    assert cli.main(["prune", "--model", str(model_dir), "--criterion", "fisher", "--pattern", "2:4", "--num-samples",
                     "4", "--seq-len", "16", "--output-dir", str(pruned_dir), *common]) == 0  # fmt: skip
    argv = ["recover", str(pruned_dir), "--recover-steps", "5", "--recover-lr", "0.003", "--recover-batch-size", "2",
            "--recover-seq-len", "16", "--recover-distill-alpha", "0.5", "--eval", "--eval-num-samples", "4",
            "--output-dir", str(out), *common]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "pruned weights kept at zero: True" in printed and "held-out perplexity: pruned" in printed
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["recovery"]["teacher"] == model_dir.name and report["recovery"]["distill_alpha"] == 0.5
    assert all(t["nm_groups_valid"] for t in report["per_tensor"].values()) and report["verified"]
    from transformers import AutoModelForCausalLM

    for name, p in AutoModelForCausalLM.from_pretrained(out).named_parameters():
        if name in report["per_tensor"]:
            assert ((p.reshape(-1, 4) != 0).sum(1) <= 2).all(), name  # still 2:4
