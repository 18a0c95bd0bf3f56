"""Calibration statistics: sums equal per-batch gradients added by hand, gradients are freed, only the
needed sums are allocated, non-finite gradients are skipped, and gradient accumulation, host staging and
activation checkpointing all give the hand-computed statistics."""

import pytest
import torch

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.calibration.loop import calibrate, causal_lm_loss, gather_statistics
from llm_gradprune.calibration.stats import ActStats, GradStats, Statistics
from llm_gradprune.errors import ConfigError
from llm_gradprune.plan import make_plan
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama

ALL = ("grad_sum", "grad_abs_sum", "grad_sq_sum")


def grad_only(gs: GradStats, acts: ActStats | None = None) -> Statistics:
    return Statistics({"grad": gs, **({"act": acts} if acts is not None else {})})


def reference_grads(model, batches, names):
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for b in batches:
        for n in names:
            params[n].requires_grad_(True)
            params[n].grad = None
        causal_lm_loss(model, b).backward()
        out.append({n: params[n].grad.clone() for n in names})
    for n in names:
        params[n].grad = None
        params[n].requires_grad_(False)
    return out


def test_sums_match_per_batch_gradients_and_grads_are_freed():
    model = make_tiny_llama()
    targets = find_targets(model)
    params = {f"{n}.weight": m.weight for n, m in targets.items()}
    batches = list(make_blocks(6, 16).split(2))
    ref = reference_grads(model, batches, list(params))
    stats = GradStats(params, ("grad_sum", "grad_abs_sum", "grad_sq_sum"))
    seen_none = []

    # after each backward every target gradient must already be released
    def loss_fn(m, b):
        seen_none.append(all(p.grad is None for p in params.values()))
        return causal_lm_loss(m, b)

    counters = calibrate(model, batches, grad_only(stats), loss_fn=loss_fn, progress=False)
    assert counters["batches"] == 3 and counters["tokens"] == 6 * 16
    assert all(seen_none)
    assert all(p.grad is None and not p.requires_grad for p in params.values())
    for n in params:
        gs = torch.stack([r[n] for r in ref])
        torch.testing.assert_close(stats.sums["grad_sum"][n], gs.sum(0))
        torch.testing.assert_close(stats.sums["grad_abs_sum"][n], gs.abs().sum(0))
        torch.testing.assert_close(stats.sums["grad_sq_sum"][n], gs.square().sum(0))
        assert stats.counts[n] == 3


def test_only_requested_sums_are_allocated():
    model = make_tiny_llama()
    params = {f"{n}.weight": m.weight for n, m in find_targets(model).items()}
    assert set(GradStats(params, ("grad_sq_sum",)).sums) == {"grad_sq_sum"}


def test_half_precision_squares_do_not_underflow():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    stats = GradStats({"p": p}, ("grad_sq_sum",))
    g = torch.full((4,), 1e-4, dtype=torch.float16)
    assert (g * g == 0).all()  # squared in fp16 it would vanish
    stats.fold("p", g)
    torch.testing.assert_close(stats.sums["grad_sq_sum"]["p"], torch.full((4,), float(g[0]) ** 2))


def test_nonfinite_gradient_is_skipped_and_counted():
    p = torch.nn.Parameter(torch.zeros(3))
    stats = GradStats({"p": p}, ("grad_sum",))
    stats.fold("p", torch.ones(3))
    with pytest.warns(UserWarning, match="non-finite"):
        stats.fold("p", torch.tensor([1.0, float("inf"), 0.0]))
    assert stats.counts["p"] == 1 and stats.skipped["p"] == 1
    torch.testing.assert_close(stats.mean("grad_sum", "p"), torch.ones(3))


def test_activation_sums_by_hand():
    lin = torch.nn.Linear(2, 1, bias=False)
    acts = ActStats({"lin": lin}).attach()
    lin(torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]))
    acts.detach()
    torch.testing.assert_close(acts.mean_sq("lin"), torch.tensor([5.0, 2.0]))
    stats = Statistics({"act": acts}, needs={"act_sq_mean"})  # read as every accumulator is: by weight name
    assert stats.has("act_sq_mean") and not stats.has("grad_sq_mean")
    torch.testing.assert_close(stats.mean("act_sq_mean", "lin.weight"), torch.tensor([5.0, 2.0]))


def test_a_window_stays_open_until_its_mean_is_folded():
    p = torch.nn.Parameter(torch.zeros(3))
    stats = GradStats({"p": p}, ("grad_sum",), grad_accum=2)
    stats.receive("p", torch.ones(3))
    assert stats.accumulating and stats.counts["p"] == 0  # a saved state would miss this gradient
    stats.receive("p", torch.full((3,), 3.0))
    stats.end_accumulation(2)
    assert not stats.accumulating and stats.counts["p"] == 1
    torch.testing.assert_close(stats.mean("grad_sum", "p"), torch.full((3,), 2.0))


# criterion -> (gradient sums allocated, activation sums allocated): written out by hand
EXPECTED_ACCUMULATORS = {
    "token_fisher": (set(), False),
    "ria": (set(), True),
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
def test_accumulator_set_per_criterion(criterion):
    model = make_tiny_llama()
    cfg = PruneConfig(criterion=criterion, progress=False)
    plan = make_plan(model, cfg)
    stats, _ = gather_statistics(
        model, list(make_blocks(2, 16).split(1)), plan.whole_stats, plan.targets, progress=False
    )
    grads, acts = EXPECTED_ACCUMULATORS[criterion]
    gs = stats.grad
    if grads:
        assert set(gs.sums) == grads
        # one fp32 tensor per target weight and statistic, nothing else
        assert sum(len(v) for v in gs.sums.values()) == len(grads) * 14
        assert all(t.dtype == torch.float32 for v in gs.sums.values() for t in v.values())
    else:  # token_fisher too: its hooks start the backward, no weight gradient is formed
        assert gs is None
        assert all(not p.requires_grad for p in model.parameters())
    assert ("act" in stats.by_source) == acts
    assert ("token" in stats.by_source) == (criterion == "token_fisher")


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
        calibrate(model, batches, grad_only(stats), loss_fn=loss_fn, progress=False)
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

    cfg = PruneConfig(criterion="fisher", progress=False)
    with pytest.warns(UserWarning, match="non-finite"):
        res = prune_(model, batches, cfg, loss_fn=loss_fn, return_masks=False)
    skipped = res.report["calibration"]["skipped_nonfinite"]
    assert len(skipped) == 14 and set(skipped.values()) == {1}


def test_grad_accum_folds_window_means():
    model, params = setup()
    batches = list(make_blocks(5, 16).split(1))
    names = list(params)
    ref = reference_grads(model, batches, names)
    stats = GradStats(params, ALL, grad_accum=2)
    counters = calibrate(model, batches, grad_only(stats), progress=False)
    assert counters["batches"] == 5 and counters["samples"] == 3
    for n in names:
        windows = [(ref[0][n] + ref[1][n]) / 2, (ref[2][n] + ref[3][n]) / 2, ref[4][n]]  # last window of 1
        g = torch.stack(windows)
        torch.testing.assert_close(stats.sums["grad_sum"][n], g.sum(0))
        torch.testing.assert_close(stats.sums["grad_abs_sum"][n], g.abs().sum(0))
        torch.testing.assert_close(stats.sums["grad_sq_sum"][n], g.square().sum(0))
        assert stats.counts[n] == 3
    assert all(p.grad is None for p in params.values())


def test_host_staged_statistics_equal_direct():
    model, params = setup()
    batches = list(make_blocks(3, 16).split(1))
    direct = GradStats(params, ALL)
    calibrate(model, batches, grad_only(direct), progress=False)
    staged = GradStats(params, ALL, device="cpu", grad_accum=2)
    staged.stage_on_host = True  # the pinned-buffer path a GPU model takes, run on the CPU
    calibrate(model, batches, grad_only(staged), progress=False)
    plain2 = GradStats(params, ALL, grad_accum=2)
    calibrate(model, batches, grad_only(plain2), progress=False)
    for stat in ALL:
        for n in params:
            torch.testing.assert_close(staged.sums[stat][n], plain2.sums[stat][n])
    staged1 = GradStats(params, ALL, device="cpu")
    staged1.stage_on_host = True
    calibrate(model, batches, grad_only(staged1), progress=False)
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
    calibrate(model, batches, grad_only(plain, plain_act), progress=False)
    n_plain = len(runs)
    ckpt, ckpt_act = GradStats(params, ALL), ActStats(modules)
    counters = calibrate(model, batches, grad_only(ckpt, ckpt_act), progress=False, checkpointing=True)
    assert n_plain == 3 and len(runs) - n_plain == 6  # forward + recompute in backward
    assert counters["recomputed_layers"] == 2
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
    base = PruneConfig(criterion="fisher", progress=False, scope="global", allow_empty_tensors=True)
    ref = prune_(make_tiny_llama(), list(make_blocks(4, 16).split(1)), base)
    cfg = PruneConfig(criterion="fisher", progress=False, scope="global", allow_empty_tensors=True,
                      stats_device="cpu", gradient_checkpointing=True, scores_dir=str(tmp_path))  # fmt: skip
    res = prune_(make_tiny_llama(), list(make_blocks(4, 16).split(1)), cfg)
    cal = res.report["calibration"]
    assert cal["stats_device"] == "cpu" and cal["gradient_checkpointing"] and cal["gradients"] == 4
    assert cal["recomputed_layers"] == 2 and res.report["mode"]["scores_on_disk"]
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
        (
            {"criterion": "wanda", "grad_accum": 2},
            "grad_accum 2 averages gradients, but criterion 'wanda' reads no",
        ),
        (
            {"criterion": "magnitude", "stats_device": "cpu"},
            "stats_device 'cpu' places gradient statistics, but",
        ),
        (
            {"criterion": "wanda", "gradient_checkpointing": True},
            "gradient_checkpointing recomputes activations in backward, but",
        ),
    ],
)
def test_scale_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        PruneConfig(**kw)


def test_token_fisher_sums_are_the_same_with_gradient_checkpointing():
    """The per-token Fisher hook sits on layer outputs: a checkpointed layer's recompute in backward
    must neither add its tokens twice nor lose them."""
    batches = list(make_blocks(3, 16).split(1))
    sums = {}
    for ckpt in (False, True):
        model = make_tiny_llama()
        targets = find_targets(model)
        stats, _ = gather_statistics(
            model, batches, {"token_grad_sq_mean"}, targets, checkpointing=ckpt, progress=False
        )
        tok = stats.by_source["token"]
        assert all(t == 48 for t in tok.tokens.values()) and len(tok.tokens) == len(targets)
        sums[ckpt] = tok.sums
    for n in sums[False]:
        assert sums[False][n].abs().sum() > 0
        torch.testing.assert_close(sums[True][n], sums[False][n], rtol=1e-5, atol=1e-9)


def test_saved_statistics_prune_exactly_like_a_fresh_pass(tmp_path):
    """A sweep calibrates once: statistics saved and loaded give the very masks of a fresh pass."""
    from llm_gradprune.io.stats_files import load_statistics, save_statistics

    batches = list(make_blocks(4, 16).split(1))
    model = make_tiny_llama()
    targets = find_targets(model)
    needs = {"grad_sq_mean", "act_sq_mean", "token_grad_sq_mean"}
    stats, _ = gather_statistics(model, batches, needs, targets, progress=False)
    save_statistics(tmp_path / "s", stats)
    for cfg in (PruneConfig(criterion="gblm", progress=False), PruneConfig(criterion="token_fisher", scope="tensor",
                progress=False), PruneConfig(criterion="fisher", reconstruct="obs", progress=False)):  # fmt: skip
        fresh = prune_(make_tiny_llama(), batches, cfg)
        fresh_model = make_tiny_llama()
        loaded = prune_(
            fresh_model, batches, cfg, statistics=load_statistics(tmp_path / "s", find_targets(fresh_model))
        )
        assert all(torch.equal(fresh.masks[n], loaded.masks[n]) for n in fresh.masks), cfg.criterion
        assert loaded.report["calibration"]["batches"] == 4 and loaded.report["calibration"]["tokens"] == 64
    with pytest.raises(ConfigError, match="the given statistics lack grad_mean"):
        prune_(make_tiny_llama(), batches, PruneConfig(criterion="taylor", progress=False),
               statistics=load_statistics(tmp_path / "s", targets))  # fmt: skip


def test_thread_setting_is_applied_and_reported(monkeypatch):
    seen = []

    def loss_fn(m, b):
        seen.append(torch.get_num_threads())
        return causal_lm_loss(m, b)

    before = torch.get_num_threads()
    rep = prune_(make_tiny_llama(), list(make_blocks(2, 16).split(1)), PruneConfig(criterion="fisher", threads=1,
                 progress=False), loss_fn=loss_fn).report  # fmt: skip
    assert seen == [1, 1] and rep["calibration"]["threads"] == 1 and torch.get_num_threads() == before
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    from llm_gradprune.parallel import default_threads

    rep = prune_(make_tiny_llama(), None, PruneConfig(criterion="magnitude", progress=False)).report
    assert rep["calibration"]["threads"] == default_threads() >= 1
