"""The block refit (`block_steps`, issue 26): a block's kept weights trained jointly against the dense block.

Pruned weights stay exactly 0 and 2:4 stays 2:4 (the masks are those of the run without the refit); the
block's output error after the refit is at most its error after lsq, measured here independently of the
report; the same settings give the same weights; settings that do not apply are refused. One process
against two: tests/test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.errors import ConfigError
from llm_gradprune.reconstruction.block import block_loss
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama


def _batches() -> list[torch.Tensor]:
    return list(make_blocks(6, 24, seed=3).split(2))


def _pruned(model, **kw):
    result = prune_(model, _batches(), PruneConfig(progress=False, **kw))
    return model, result.report


def _weights(model) -> dict[str, torch.Tensor]:
    return {t.key: t.weight.detach().clone() for t in find_targets(model).values()}


@pytest.mark.parametrize(
    "kw", [{"criterion": "sparsegpt", "pattern": "2:4"}, {"criterion": "wanda", "reconstruct": "lsq"}]
)
def test_pruned_weights_stay_zero_and_the_masks_are_those_chosen(kw):
    """Every weight zero when its block's masks were chosen (the report counts them then) is zero after the
    refit, and no other: the count is the same and 2:4 stays 2:4. Block 0, whose inputs the refit does not
    change, gets exactly the masks of the run without it; every target's kept weights moved."""
    plain, _ = _pruned(make_tiny_llama(), **kw)
    refit, report = _pruned(make_tiny_llama(), block_steps=5, block_lr=1e-3, **kw)
    for name, w in _weights(refit).items():
        assert int((w == 0).sum()) == report["per_tensor"][name]["zeros"], name
        if name.startswith("model.layers.0."):
            assert torch.equal(w == 0, _weights(plain)[name] == 0), name
        assert not torch.equal(w, _weights(plain)[name]), name
        if kw.get("pattern") == "2:4":
            assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), name
    per_block = report["mode"]["block_refit"]["per_block"]
    assert len(per_block) == 2 and all(b["loss_after"] < b["loss_before"] for b in per_block)


def _block0_error(dense, pruned, kind: str) -> float:
    """Output error per token of `pruned`'s block 0 against the dense block 0, on the dense model's block-0
    inputs for the calibration batches (the embeddings: the same for every model here)."""
    from llm_gradprune.executors.blocks import capture_block_inputs, dense_outputs

    dense.eval()
    calls = capture_block_inputs(dense, dense.model.layers, _batches(), device=torch.device("cpu"))
    calls.use_block(0)
    want = dense_outputs(dense.model.layers[0], list(calls), torch.device("cpu"))
    got = dense_outputs(pruned.model.layers[0], list(calls), torch.device("cpu"))
    tokens = sum(y.shape[:-1].numel() for y in want)
    return sum(float(block_loss(g, y, kind)) for g, y in zip(got, want, strict=True)) / tokens


@pytest.mark.parametrize("kind", ["mse", "normalized"])
def test_the_block_error_after_the_refit_is_at_most_the_lsq_one(kind):
    dense = make_tiny_llama()
    lsq, _ = _pruned(copy.deepcopy(dense), criterion="wanda", reconstruct="lsq")
    refit, _ = _pruned(copy.deepcopy(dense), criterion="wanda", reconstruct="lsq", block_steps=10, block_lr=1e-3,
                       block_loss=kind)  # fmt: skip
    after_lsq, after_refit = _block0_error(dense, lsq, kind), _block0_error(dense, refit, kind)
    assert after_refit <= after_lsq and after_refit < 0.9 * after_lsq, (after_lsq, after_refit)


def _block1_loss_after(dense, pruned, target: str) -> float:
    """By hand, the refit's loss per token of block 1 after it: the pruned block 1 on the pruned block 0's
    outputs, against the dense block 1 on those same inputs (target pruned) or on the dense block 0's
    outputs (target dense)."""
    from llm_gradprune.executors.blocks import capture_block_inputs, dense_outputs, with_hidden

    cpu = torch.device("cpu")
    dense.eval()
    calls = capture_block_inputs(dense, dense.model.layers, _batches(), device=cpu)
    calls.use_block(1)  # alike blocks: block 1's own inputs besides the hidden states are block 0's

    def then(layer, hidden):
        return dense_outputs(layer, [with_hidden(*c, h) for c, h in zip(calls, hidden, strict=True)], cpu)

    x0 = [c[0][0] for c in calls]
    x1_pruned = then(pruned.model.layers[0], x0)
    x1_target = then(dense.model.layers[0], x0) if target == "dense" else x1_pruned
    want = then(dense.model.layers[1], x1_target)
    got = then(pruned.model.layers[1], x1_pruned)
    tokens = sum(y.shape[:-1].numel() for y in want)
    return sum(float(block_loss(g, y, "mse")) for g, y in zip(got, want, strict=True)) / tokens


@pytest.mark.parametrize("target", ["pruned", "dense"])
def test_the_refit_target_is_the_dense_block_on_the_inputs_it_names(target):
    """block_target pruned: the dense block's outputs on the pruned model's hidden states; dense: the dense
    model's own outputs of the block. Block 0 gets the same inputs either way; block 1's reported loss
    after the refit is the one computed by hand against the named target."""
    dense = make_tiny_llama()
    refit, report = _pruned(copy.deepcopy(dense), criterion="wanda", block_steps=4, block_lr=1e-3,
                            block_target=target)  # fmt: skip
    per_block = report["mode"]["block_refit"]["per_block"]
    assert report["mode"]["block_refit"]["target"] == target
    assert per_block[1]["loss_after"] == pytest.approx(_block1_loss_after(dense, refit, target), rel=1e-4)
    other = _block1_loss_after(dense, refit, "pruned" if target == "dense" else "dense")
    assert per_block[1]["loss_after"] != pytest.approx(other, rel=1e-2)  # the two targets differ
    _, plain = _pruned(copy.deepcopy(dense), criterion="wanda", block_steps=4, block_lr=1e-3)
    assert per_block[0] == plain["mode"]["block_refit"]["per_block"][0]


def test_a_step_every_micro_batch_makes_more_updates_for_the_same_passes():
    """block_batch 1 over 3 micro-batches: 3 Adam updates a pass, each on its own micro-batch's mean loss;
    block 0's loss before and masks are the full-batch run's (block 1's inputs come from the refit block 0);
    block_batch 3 (all of them) is the full-batch run bit for bit; more updates end lower on this model."""
    kw = dict(criterion="wanda", block_steps=4, block_lr=1e-3)
    full, full_report = _pruned(make_tiny_llama(), **kw)
    every, every_report = _pruned(make_tiny_llama(), block_batch=1, **kw)
    all3, _ = _pruned(make_tiny_llama(), block_batch=3, **kw)
    a, b = full_report["mode"]["block_refit"], every_report["mode"]["block_refit"]
    assert b["batch"] == 1 and [x["updates"] for x in b["per_block"]] == [12, 12]
    assert [x["updates"] for x in a["per_block"]] == [4, 4]
    assert b["per_block"][0]["loss_before"] == pytest.approx(a["per_block"][0]["loss_before"], rel=1e-6)
    for x, y in zip(a["per_block"], b["per_block"], strict=True):
        assert y["loss_after"] < x["loss_after"] < x["loss_before"]
    for name, w in _weights(every).items():
        if name.startswith("model.layers.0."):
            assert torch.equal(w == 0, _weights(full)[name] == 0), name
        assert int((w == 0).sum()) == every_report["per_tensor"][name]["zeros"], name
        assert torch.equal(_weights(all3)[name], _weights(full)[name]), name


def test_the_same_settings_give_the_same_weights():
    a, _ = _pruned(make_tiny_llama(), criterion="sparsegpt", block_steps=3, block_lr=1e-3)
    b, _ = _pruned(make_tiny_llama(), criterion="sparsegpt", block_steps=3, block_lr=1e-3)
    for name, w in _weights(a).items():
        assert torch.equal(w, _weights(b)[name]), name


def test_block_settings_without_steps_are_refused_and_steps_turn_on_layer_wise():
    with pytest.raises(ConfigError, match=r"block_lr 0\.01 applies with block_steps > 0 only"):
        PruneConfig(block_lr=0.01)
    with pytest.raises(ConfigError, match=r"block_loss 'normalized' applies with block_steps > 0 only"):
        PruneConfig(block_loss="normalized")
    with pytest.raises(ConfigError, match=r"block_target 'pruned' applies with block_steps > 0 only"):
        PruneConfig(block_target="pruned")
    with pytest.raises(ConfigError, match=r"block_batch 2 applies with block_steps > 0 only"):
        PruneConfig(block_batch=2)
    assert PruneConfig(criterion="wanda", block_steps=2).layer_wise


def _block0():
    """A tiny Llama's first block (weights frozen), its recorded calls and its targets."""
    from llm_gradprune.executors.blocks import capture_block_inputs

    model = make_tiny_llama().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calls = capture_block_inputs(model, model.model.layers, _batches(), device=torch.device("cpu"))
    calls.use_block(0)
    targets = {n: t for n, t in find_targets(model).items() if n.startswith("model.layers.0.")}
    return model.model.layers[0], calls, targets


def test_the_regional_gradient_is_the_block_output_norm_gradient_by_hand():
    """criterion regional: block_grad_abs_mean of a block-0 weight equals the mean over micro-batches of
    |d sum_samples ||block0(X)||_2 / dw| computed by autograd on the block's inputs, and the scores are
    |w| (alpha G + rms(x))."""
    from llm_gradprune.calibration.stats import make_statistics
    from llm_gradprune.executors.blocks import run_block_backward
    from llm_gradprune.scoring.criteria import CRITERIA

    block, calls, targets = _block0()
    stats = make_statistics({"block_grad_abs_mean"}, targets)
    acc = stats.by_source["blockgrad"].attach()
    run_block_backward(block, list(calls), torch.device("cpu"))
    acc.detach()
    w = block.mlp.down_proj.weight
    want = torch.zeros_like(w)
    for args, kwargs in calls:
        w.requires_grad_(True)
        out = block(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad(h.flatten(1).norm(dim=1).sum(), w)
        want += g.abs()
        w.requires_grad_(False)
    got = stats.mean("block_grad_abs_mean", "model.layers.0.mlp.down_proj.weight")
    assert torch.allclose(got, want / len(calls), rtol=1e-4, atol=1e-8)
    act = torch.rand(w.shape[1])
    score = CRITERIA.get("regional").fn(w, got, act, alpha=10.0)
    assert torch.allclose(score, w.abs() * (10.0 * got + act.sqrt()))
    assert CRITERIA.get("regional").block_local and PruneConfig(criterion="regional").layer_wise


def _block_token_sq(block, targets, calls) -> dict:
    from llm_gradprune.calibration.stats import make_statistics
    from llm_gradprune.executors.blocks import run_block_backward

    stats = make_statistics({"block_token_sq_mean"}, targets)
    acc = stats.by_source["blocktoken"].attach()
    try:
        run_block_backward(block, list(calls), torch.device("cpu"), "probe")
    finally:
        acc.detach()
    names = ("mlp.up_proj", "mlp.down_proj", "self_attn.k_proj")
    return {n: stats.mean("block_token_sq_mean", f"model.layers.0.{n}.weight") for n in names}


def test_the_block_curvature_is_the_probe_gradient_per_token_by_hand():
    """criterion block_fisher: block_token_sq_mean of a block-0 weight is the mean over tokens of
    (d<r, block0(X)>/dy_t,i)^2 x_t,j^2 with each call's fixed Rademacher probe r, by autograd on the
    block's inputs; down_proj's token weights are exactly 1 (the residual is the identity), so its rows
    rank as Wanda's; the same calls give the same statistic (the probes are fixed)."""
    from llm_gradprune.executors.blocks import probe
    from llm_gradprune.scoring.criteria import CRITERIA

    block, calls, targets = _block0()
    got = {n: _block_token_sq(block, targets, calls) for n in ("first", "again")}
    assert all(torch.equal(got["first"][n], got["again"][n]) for n in got["first"])
    got = got["first"]
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append((i[0], o)))
             for n, m in (("up", block.mlp.up_proj), ("down", block.mlp.down_proj), ("k", block.self_attn.k_proj))]  # fmt: skip
    want = {n: 0.0 for n in ("up", "down", "k")}
    tokens = 0
    for index, (args, kwargs) in enumerate(calls):
        seen.clear()
        for m in (block.mlp.up_proj, block.mlp.down_proj, block.self_attn.k_proj):
            m.weight.requires_grad_(True)  # so that every layer output is in the graph
        out = block(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        outs = {n: seen[n][0][1] for n in want}
        grads = torch.autograd.grad((h * probe(h.shape, index, h.device)).sum(), list(outs.values()))
        for (n, (x, _)), g in zip(((n, seen[n][0]) for n in want), grads, strict=True):
            g2, x2 = g.reshape(-1, g.shape[-1]).square(), x.reshape(-1, x.shape[-1]).square()
            want[n] = want[n] + g2.T @ x2
        tokens += h.shape[0] * h.shape[1]
    for h in hooks:
        h.remove()
    for m in block.parameters():
        m.requires_grad_(False)
    for short, name in (("up", "mlp.up_proj"), ("down", "mlp.down_proj"), ("k", "self_attn.k_proj")):
        assert torch.allclose(got[name], want[short] / tokens, rtol=1e-4, atol=1e-9), name
    rows = got["mlp.down_proj"]
    assert torch.allclose(rows, rows[:1].expand_as(rows), rtol=1e-6)  # every row: E_t[x_j^2]
    w = block.mlp.up_proj.weight
    assert torch.equal(
        CRITERIA.get("block_fisher").fn(w, got["mlp.up_proj"]), w.square() * got["mlp.up_proj"]
    )
    assert CRITERIA.get("block_fisher").block_local and PruneConfig(criterion="block_fisher").layer_wise


def test_a_mask_only_block_local_criterion_reads_the_dense_block_inputs_by_default():
    """`sequential` unset: the pruned blocks' outputs feed the next block only where weights are updated
    (sparsegpt, obs/lsq, a block refit, true_sequential); block_fisher and regional alone read the dense
    model's block inputs, as `sequential: false` does, and the report says which it was."""
    assert not PruneConfig(criterion="block_fisher").sequential_inputs
    assert not PruneConfig(criterion="regional").sequential_inputs
    assert PruneConfig(criterion="block_fisher", sequential=True).sequential_inputs
    for kw in ({"reconstruct": "lsq"}, {"block_steps": 2}, {"true_sequential": True}):
        assert PruneConfig(criterion="block_fisher", **kw).sequential_inputs, kw
    assert PruneConfig(criterion="sparsegpt").sequential_inputs
    assert not PruneConfig(criterion="wanda").sequential_inputs  # whole-model: no block inputs at all
    runs = {}
    for name, kw in (("default", {}), ("dense", {"sequential": False}), ("pruned", {"sequential": True})):
        model, report = _pruned(make_tiny_llama().eval(), criterion="block_fisher", scope="row", **kw)
        runs[name] = (_weights(model), report["mode"]["sequential"])
    assert runs["default"][1] is False and runs["pruned"][1] is True
    assert all(torch.equal(w, runs["dense"][0][n]) for n, w in runs["default"][0].items())
    assert not all(torch.equal(w, runs["pruned"][0][n]) for n, w in runs["default"][0].items())


@pytest.mark.parametrize(
    "kw", [{"criterion": "wanda", "scope": "row"}, {"criterion": "wanda", "pattern": "2:4"}]
)
def test_dynamic_masks_move_within_each_rows_count_and_end_exact(kw):
    """block_mask dynamic: the masks change between passes, each row keeps exactly its count (2:4 stays
    2:4), every pruned weight is exactly 0, the masks returned and the report's counts are where the
    masks ended, and the same command gives the same weights."""
    runs = []
    for _ in range(2):
        model = make_tiny_llama().eval()
        cfg = PruneConfig(
            progress=False, block_steps=3, block_lr=1e-2, block_batch=1, block_mask="dynamic", **kw
        )
        result = prune_(model, _batches(), cfg)
        runs.append(_weights(model))
        per = result.report["mode"]["block_refit"]["per_block"]
        assert result.report["mode"]["block_refit"]["mask"] == "dynamic"
        assert all(b["mask_changes"] > 0 for b in per)
        for name, w in runs[-1].items():
            assert torch.equal(result.masks[name], w == 0), name
            assert result.report["per_tensor"][name]["masked"] == int((w == 0).sum()) == w.numel() // 2, name
    fixed, _ = _pruned(make_tiny_llama().eval(), **kw)
    for name, w in runs[0].items():
        assert torch.equal(w, runs[1][name]), name
        kept = w != 0
        if "pattern" in kw:
            assert (kept.reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:
            assert (kept.sum(1) == w.shape[1] // 2).all(), name
    moved = sum(int(((runs[0][n] != 0) != (w != 0)).sum()) for n, w in _weights(fixed).items())
    assert moved > 0


def test_dynamic_masks_are_refused_where_they_cannot_apply():
    with pytest.raises(ConfigError, match=r"block_mask 'dynamic' applies with block_steps > 0 only"):
        PruneConfig(block_mask="dynamic")
    with pytest.raises(ConfigError, match=r"rounds 2 with block_mask dynamic"):
        PruneConfig(criterion="wanda", rounds=2, block_steps=2, block_mask="dynamic")
