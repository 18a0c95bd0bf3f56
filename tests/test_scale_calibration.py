"""Calibration at scale: only the needed sums, non-finite gradients skipped, gradient accumulation,
host-staged statistics and activation checkpointing all give the hand-computed statistics."""

import pytest
import torch

from llm_gradprune import PruneConfig, prune_
from llm_gradprune import pruner as pruner_mod
from llm_gradprune.calibrate import calibrate, causal_lm_loss
from llm_gradprune.config import ConfigError
from llm_gradprune.stats import ActStats, GradStats
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama
from .test_stats import reference_grads

ALL = ("grad_sum", "grad_abs_sum", "grad_sq_sum")

# criterion -> (gradient sums allocated, activation sums allocated): written out by hand
EXPECTED_ACCUMULATORS = {
    "magnitude": (set(), False),
    "gradient": ({"grad_abs_sum"}, False),
    "taylor": ({"grad_sum"}, False),
    "fisher": ({"grad_sq_sum"}, False),
    "wanda": (set(), True),
    "gblm": ({"grad_sq_sum"}, True),
    "blend": ({"grad_sq_sum"}, True),
}


def setup(dtype=torch.float32):
    model = make_tiny_llama().to(dtype)
    params = {f"{n}.weight": m.weight for n, m in find_targets(model).items()}
    return model, params


@pytest.mark.parametrize("criterion", sorted(EXPECTED_ACCUMULATORS))
def test_accumulator_set_per_criterion(monkeypatch, criterion):
    made = {"grad": [], "act": []}

    class SpyGrad(GradStats):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made["grad"].append(self)

    real_act = pruner_mod.ActStats

    def spy_act(*a, **kw):
        made["act"].append(real_act(*a, **kw))
        return made["act"][-1]

    monkeypatch.setattr(pruner_mod, "GradStats", SpyGrad)
    monkeypatch.setattr(pruner_mod, "ActStats", spy_act)
    model = make_tiny_llama()
    cfg = PruneConfig(criterion=criterion, num_samples=2, seq_len=16, progress=False)
    prune_(model, list(make_blocks(2, 16).split(1)), cfg, return_masks=False)
    grads, acts = EXPECTED_ACCUMULATORS[criterion]
    if grads:
        (gs,) = made["grad"]
        assert set(gs.sums) == grads
        # one fp32 tensor per target weight and statistic, nothing else
        assert sum(len(v) for v in gs.sums.values()) == len(grads) * 14
        assert all(t.dtype == torch.float32 for v in gs.sums.values() for t in v.values())
    else:
        assert made["grad"] == []
    assert len(made["act"]) == int(acts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_inf_skips_that_tensor_and_batch_only(dtype):
    model, params = setup(dtype)
    batches = list(make_blocks(4, 16).split(1))
    names = list(params)
    bad = names[3]
    ref = reference_grads(model, batches, names)
    stats = GradStats(params, ALL)
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        if calls["n"] == 2:  # plant an overflow in one tensor's gradient of the second batch
            handle.append(params[bad].register_hook(lambda g: torch.full_like(g, float("inf"))))
        elif handle:
            handle.pop().remove()
        return causal_lm_loss(m, b)

    handle: list = []
    with pytest.warns(UserWarning, match="non-finite gradient for " + bad.replace(".", r"\.")):
        calibrate(model, batches, stats, loss_fn=loss_fn, progress=False)
    assert stats.skipped == {n: int(n == bad) for n in names}
    assert stats.counts == {n: 4 - int(n == bad) for n in names}
    keep = [0, 2, 3]
    expected = torch.stack([ref[i][bad].float() for i in keep]).square().sum(0)
    torch.testing.assert_close(stats.sums["grad_sq_sum"][bad], expected)
    other = names[0]
    torch.testing.assert_close(
        stats.sums["grad_sq_sum"][other], torch.stack([r[other].float() for r in ref]).square().sum(0)
    )
    assert all(t.dtype == torch.float32 for v in stats.sums.values() for t in v.values())


def test_nonfinite_batch_reported_by_prune(tmp_path):
    model = make_tiny_llama()
    batches = list(make_blocks(3, 16).split(1))
    n = {"i": 0}

    def loss_fn(m, b):
        n["i"] += 1
        loss = causal_lm_loss(m, b)
        return loss * float("inf") if n["i"] == 3 else loss  # every gradient of batch 3 overflows

    cfg = PruneConfig(criterion="fisher", num_samples=3, seq_len=16, progress=False)
    with pytest.warns(UserWarning, match="non-finite"):
        res = prune_(model, batches, cfg, loss_fn=loss_fn, return_masks=False)
    skipped = res.report["calibration"]["skipped_nonfinite"]
    assert len(skipped) == 14 and set(skipped.values()) == {1}


def test_grad_accum_folds_group_means():
    model, params = setup()
    batches = list(make_blocks(5, 16).split(1))
    names = list(params)
    ref = reference_grads(model, batches, names)
    stats = GradStats(params, ALL)
    counters = calibrate(model, batches, stats, progress=False, grad_accum=2)
    assert counters["batches"] == 5 and counters["samples"] == 3
    for n in names:
        groups = [(ref[0][n] + ref[1][n]) / 2, (ref[2][n] + ref[3][n]) / 2, ref[4][n]]  # last group of 1
        g = torch.stack(groups)
        torch.testing.assert_close(stats.sums["grad_sum"][n], g.sum(0))
        torch.testing.assert_close(stats.sums["grad_abs_sum"][n], g.abs().sum(0))
        torch.testing.assert_close(stats.sums["grad_sq_sum"][n], g.square().sum(0))
        assert stats.counts[n] == 3
    assert all(p.grad is None for p in params.values())


def test_host_staged_statistics_equal_direct():
    model, params = setup()
    batches = list(make_blocks(3, 16).split(1))
    direct = GradStats(params, ALL)
    calibrate(model, batches, direct, progress=False)
    staged = GradStats(params, ALL, device="cpu")
    staged.stage_on_host = True  # the pinned-buffer path a GPU model takes, run on the CPU
    calibrate(model, batches, staged, progress=False, grad_accum=2)
    plain2 = GradStats(params, ALL)
    calibrate(model, batches, plain2, progress=False, grad_accum=2)
    for stat in ALL:
        for n in params:
            torch.testing.assert_close(staged.sums[stat][n], plain2.sums[stat][n])
    staged1 = GradStats(params, ALL, device="cpu")
    staged1.stage_on_host = True
    calibrate(model, batches, staged1, progress=False)
    for stat in ALL:
        for n in params:
            torch.testing.assert_close(staged1.sums[stat][n], direct.sums[stat][n])
    assert staged1.counts == direct.counts


def test_gradient_checkpointing_same_statistics_and_really_recomputes():
    model, params = setup()
    batches = list(make_blocks(3, 16).split(1))
    mlp = model.model.layers[0].mlp
    runs = []
    forward = mlp.forward

    def counting_forward(*a, **kw):  # counts recomputes too (module hooks do not fire on them)
        runs.append(1)
        return forward(*a, **kw)

    mlp.forward = counting_forward
    modules = find_targets(model)
    plain, plain_act = GradStats(params, ALL), ActStats(modules)
    calibrate(model, batches, plain, plain_act, progress=False)
    n_plain = len(runs)
    ckpt, ckpt_act = GradStats(params, ALL), ActStats(modules)
    calibrate(model, batches, ckpt, ckpt_act, progress=False, checkpointing=True)
    assert n_plain == 3 and len(runs) - n_plain == 6  # forward + recompute in backward
    for stat in ALL:
        for n in params:
            torch.testing.assert_close(ckpt.sums[stat][n], plain.sums[stat][n], rtol=1e-5, atol=1e-7)
    for n in modules:  # activation sums are not counted twice by the recompute
        assert ckpt_act.tokens[n] == plain_act.tokens[n] == 48
        torch.testing.assert_close(ckpt_act.sums[n], plain_act.sums[n])
    assert not model.model.layers[0].training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(p.grad is None and not p.requires_grad for p in params.values())


def test_prune_with_scale_knobs_end_to_end(tmp_path):
    base = PruneConfig(criterion="fisher", num_samples=4, seq_len=16, progress=False, scope="global")
    ref = prune_(make_tiny_llama(), list(make_blocks(4, 16).split(1)), base)
    cfg = PruneConfig(criterion="fisher", num_samples=4, seq_len=16, progress=False, scope="global",
                      stats_device="cpu", gradient_checkpointing=True, scores_dir=str(tmp_path))  # fmt: skip
    res = prune_(make_tiny_llama(), list(make_blocks(4, 16).split(1)), cfg)
    cal = res.report["calibration"]
    assert cal["stats_device"] == "cpu" and cal["gradient_checkpointing"] and cal["gradient_samples"] == 4
    same = sum(int(torch.equal(res.masks[n], ref.masks[n])) for n in ref.masks)
    assert same >= len(ref.masks) - 1  # recompute may flip a float tie; counts are exact regardless
    assert res.report["masked_weights"] == ref.report["masked_weights"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"stats_device": "gpu"}, "stats_device 'gpu'"),
        ({"grad_accum": 0}, "grad_accum 0"),
        ({"scores_dir": "/tmp/x", "scope": "row"}, "scores_dir '/tmp/x'"),
    ],
)
def test_scale_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        PruneConfig(**kw)


def test_token_fisher_sums_are_the_same_with_gradient_checkpointing():
    """The per-token Fisher hook sits on layer outputs: a checkpointed layer's recompute in backward
    must neither add its tokens twice nor lose them."""
    from llm_gradprune.pruner import gather_statistics

    batches = list(make_blocks(3, 16).split(1))
    sums = {}
    for ckpt in (False, True):
        model = make_tiny_llama()
        targets = find_targets(model)
        cfg = PruneConfig(criterion="token_fisher", gradient_checkpointing=ckpt, progress=False)
        tok = gather_statistics(model, batches, cfg, targets, {"token_grad_sq_sum"}).token
        assert all(t == 48 for t in tok.tokens.values()) and len(tok.tokens) == len(targets)
        sums[ckpt] = tok.sums
    for n in sums[False]:
        assert sums[False][n].abs().sum() > 0
        torch.testing.assert_close(sums[True][n], sums[False][n], rtol=1e-5, atol=1e-9)
