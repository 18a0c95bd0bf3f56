"""Pruning in rounds: K = 3 lands exactly on the target, masks are nested round over round, every round
calibrates on the model the earlier rounds pruned, and an N:M target is reached from unstructured rounds."""

from __future__ import annotations

import pytest
import torch

from llm_gradprune import PruneConfig, prune_, rounds
from llm_gradprune.calibration.loop import causal_lm_loss
from llm_gradprune.errors import ConfigError
from llm_gradprune.recovery.config import RecoverConfig
from llm_gradprune.rounds import prune_in_rounds_, schedule
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama


def test_schedules():
    assert schedule(0.7, 4, "linear") == pytest.approx([0.175, 0.35, 0.525, 0.7])
    cubic = schedule(0.8, 3, "cubic")
    assert cubic == pytest.approx([0.8 * (1 - (2 / 3) ** 3), 0.8 * (1 - (1 / 3) ** 3), 0.8])
    assert cubic[0] > 0.8 / 3  # prunes fast early, slowly near the target


@pytest.mark.parametrize("criterion,kw", [("gradient", {"sparsity": 0.7}), ("fisher", {"pattern": "2:4"}),
                                          ("taylor", {"sparsity": 0.6, "scope": "global"})])  # fmt: skip
def test_three_rounds_are_nested_exact_and_recalibrated(criterion, kw, monkeypatch):
    model = make_tiny_llama()
    batches = list(make_blocks(4, 16).split(1))
    weights = {f"{n}.weight": m.weight for n, m in find_targets(model).items()}
    seen, losses_before = [], []

    def on_round(r, result):
        seen.append({n: (w == 0).clone() for n, w in weights.items()})

    real_prune = rounds.prune_

    def recording_prune(model_, batches_, cfg_, **k):  # the loss of the model as the round finds it
        with torch.no_grad():
            losses_before.append(sum(float(causal_lm_loss(model_, b)) for b in batches_) / len(batches_))
        return real_prune(model_, batches_, cfg_, **k)

    monkeypatch.setattr(rounds, "prune_", recording_prune)
    cfg = PruneConfig(criterion=criterion, rounds=3, progress=False, allow_empty_tensors=True, **kw)
    result = prune_in_rounds_(model, batches, cfg, on_round=on_round)
    per_round = result.report["rounds"]["per_round"]
    one_shot = prune_(make_tiny_llama(), batches, PruneConfig(criterion=criterion, progress=False,
                                                               allow_empty_tensors=True, **kw)).report  # fmt: skip
    assert result.report["masked_weights"] == one_shot["masked_weights"]  # exactly the target's count
    for earlier, later in zip(seen, seen[1:], strict=False):
        for n in earlier:
            assert bool((later[n] | ~earlier[n]).all()), n  # masks only grow
    sparsities = [r["overall_sparsity"] for r in per_round]
    assert sparsities == sorted(sparsities) and sparsities[-1] == one_shot["overall_sparsity"]
    # each round's calibration loss is the loss of the model the earlier rounds left (not the dense one)
    for r, entry in enumerate(per_round):
        assert entry["calibration_mean_loss"] == pytest.approx(losses_before[r], rel=1e-5)
    assert len(set(losses_before)) == 3  # and that model changed from round to round
    if "pattern" in kw:
        assert all(t["nm_groups_valid"] for t in result.report["per_tensor"].values())
        assert per_round[0]["pattern"] == "unstructured" and per_round[-1]["pattern"] == "2:4"


def test_rounds_with_recovery_between_keep_the_zeros():
    model = make_tiny_llama()
    batches = list(make_blocks(4, 16).split(1))
    cfg = PruneConfig(criterion="fisher", sparsity=0.6, rounds=2, progress=False)
    rec = RecoverConfig(round_steps=3, lr=1e-3, batch_size=4)
    result = prune_in_rounds_(
        model, batches, cfg, recover=rec, recover_batches=list(make_blocks(8, 16, seed=4).split(4))
    )
    assert result.report["rounds"]["per_round"][0]["recovery"]["steps"] == 3
    one_shot = prune_(
        make_tiny_llama(), batches, PruneConfig(criterion="fisher", sparsity=0.6, progress=False)
    )
    assert result.report["masked_weights"] == one_shot.report["masked_weights"]
    assert result.report["zero_weights"] == result.report["masked_weights"]  # the recovery kept every zero


def test_sparsegpt_rounds_towards_nm_are_refused():
    with pytest.raises(ConfigError, match="rounds 3 towards pattern 2:4 need a scoring criterion"):
        PruneConfig(criterion="sparsegpt", pattern="2:4", rounds=3)
