"""The per-token Fisher hook gives the same sums as the formula, on a tiny Llama.

Reference: every target's input x and output gradient d captured by independent hooks, and
sum_t d_t,i^2 x_t,j^2 formed in fp64. Checked with the library's statistics (weights requiring grad,
as make_statistics builds them today), with the per-token statistic alone (no weight gradient at all:
the backward starts at the hooked outputs), with gradient checkpointing, and in bf16.
"""

import pytest
import torch

from llm_gradprune.calibration.loop import calibrate, causal_lm_loss
from llm_gradprune.calibration.stats import Statistics, TokenGradStats, make_statistics
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama


def reference_sums(model, batches) -> dict[str, torch.Tensor]:
    """sum over tokens of (d_t,i x_t,j)^2 per target, in fp64, from retained output gradients."""
    targets = find_targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    sums = {n: torch.zeros(m.weight.shape, dtype=torch.float64) for n, m in targets.items()}
    seen: dict = {}

    def grab(name):
        def hook(module, inputs, output):
            output.retain_grad()
            seen[name] = (inputs[0].detach(), output)

        return hook

    for b in batches:
        seen.clear()
        handles = [m.register_forward_hook(grab(n)) for n, m in targets.items()]
        causal_lm_loss(model, b).backward()
        for h in handles:
            h.remove()
        for n, (x, y) in seen.items():
            d = y.grad.reshape(-1, y.shape[-1]).double()
            xx = x.reshape(-1, x.shape[-1]).double()
            sums[n] += d.square().T @ xx.square()
    for m in targets.values():
        m.weight.grad = None
        m.weight.requires_grad_(False)
    return sums


def run(model, batches, *, alone: bool, checkpointing: bool = False) -> TokenGradStats:
    targets = find_targets(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if alone:  # the per-token statistic without the gradient accumulator that makes weights trainable
        stats = Statistics({"token": TokenGradStats(targets)}, needs={"token_grad_sq_mean"})
    else:
        stats = make_statistics({"token_grad_sq_mean"}, targets)
    calibrate(model, batches, stats, progress=False, checkpointing=checkpointing)
    if alone:
        assert all(p.grad is None for p in model.parameters())  # no weight gradient was formed
    assert not any(p.requires_grad for p in model.parameters())
    return stats.by_source["token"]


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_token_sums_equal_the_formula(alone, checkpointing):
    batches = list(make_blocks(3, 16, seed=4).split(1))
    ref = reference_sums(make_tiny_llama(seed=1), batches)
    tok = run(make_tiny_llama(seed=1), batches, alone=alone, checkpointing=checkpointing)
    assert set(tok.sums) == set(ref) and all(t == 48 for t in tok.tokens.values())
    for n, want in ref.items():
        assert want.abs().sum() > 0
        torch.testing.assert_close(tok.sums[n].double(), want, rtol=1e-5, atol=1e-12)


def test_alone_and_with_weight_gradients_give_the_very_same_sums():
    batches = list(make_blocks(2, 16, seed=5).split(1))
    a = run(make_tiny_llama(seed=2), batches, alone=False)
    b = run(make_tiny_llama(seed=2), batches, alone=True)
    for n in a.sums:
        torch.testing.assert_close(a.sums[n], b.sums[n], rtol=1e-6, atol=0)


def test_bf16_model_squares_after_the_cast_to_fp32():
    batches = list(make_blocks(2, 16, seed=6).split(1))
    model = make_tiny_llama(seed=3).to(torch.bfloat16)
    ref = reference_sums(model, batches)  # captured bf16 tensors, squared in fp64
    tok = run(model, batches, alone=True)
    for n, want in ref.items():
        assert tok.sums[n].dtype == torch.float32
        torch.testing.assert_close(tok.sums[n].double(), want, rtol=1e-5, atol=1e-12)
