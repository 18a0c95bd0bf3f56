"""Gradient statistics: the sums equal per-batch gradients added by hand, and gradients are freed."""

import torch

from llm_gradprune.calibrate import calibrate, causal_lm_loss
from llm_gradprune.stats import ActStats, GradStats
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama


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

    counters = calibrate(model, batches, stats, loss_fn=loss_fn, progress=False)
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
    with __import__("pytest").warns(UserWarning, match="non-finite"):
        stats.fold("p", torch.tensor([1.0, float("inf"), 0.0]))
    assert stats.counts["p"] == 1 and stats.skipped["p"] == 1
    torch.testing.assert_close(stats.mean("grad_sum", "p"), torch.ones(3))


def test_activation_sums_by_hand():
    lin = torch.nn.Linear(2, 1, bias=False)
    acts = ActStats({"lin": lin}).attach()
    lin(torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]))
    acts.detach()
    torch.testing.assert_close(acts.mean_sq("lin"), torch.tensor([5.0, 2.0]))
