"""The fast least-squares refit (conjugate gradients through H^-1) gives the direct solve's answer.

Against a per-row fp64 solve of the same damped problem and against the per-row Cholesky refit the
library had before (both in tests/reference_lsq.py), on random layers of several shapes with uneven
per-row kept counts, rows that keep everything or nothing, and 2:4 masks.
"""

import pytest
import torch

from llm_gradprune.reconstruction.lsq import lsq_update_
from llm_gradprune.reconstruction.obs import damped_hessian

from .reference_lsq import direct64, old_lsq_update_


def layer(out, inp, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(n, inp, generator=g) @ torch.randn(inp, inp, generator=g)) * torch.exp(
        torch.randn(inp, generator=g)
    )  # correlated inputs, uneven channel scales
    return torch.randn(out, inp, generator=g), X, 2 * X.T @ X / n


def uneven_mask(out, inp, seed=0):
    """Per-row pruned fractions from 5% to 95%, plus one row that keeps all and one that keeps none."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, inp, generator=g) < torch.linspace(0.05, 0.95, out)[:, None]
    mask[1] = False
    mask[-2] = True
    return mask


def nm_mask(W):
    drop = W.abs().reshape(-1, 4).argsort(dim=1)[:, :2]
    return torch.zeros(W.numel() // 4, 4, dtype=torch.bool).scatter_(1, drop, True).view_as(W)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(24, 64), (40, 48), (16, 96), (64, 32)])
@pytest.mark.parametrize("kind", ["uneven", "2:4"])
def test_refit_equals_the_direct_solve_and_the_previous_refit(shape, kind):
    W0, X, H = layer(*shape, seed=shape[1])
    mask = uneven_mask(*shape, seed=shape[0]) if kind == "uneven" else nm_mask(W0)
    truth = direct64(W0, H, mask, 0.01)
    old = W0.clone()
    old_lsq_update_(old, H, mask)
    # the default split, every row by the iteration, every row directly: one answer
    for direct_max in (None, 0, shape[1]):
        W = W0.clone()
        info = lsq_update_(W, H, mask, direct_max=direct_max)
        assert rel(W, truth) < 1e-5 and rel(W, old) < 1e-5, (direct_max, rel(W, truth), rel(W, old))
        assert torch.equal(W == 0, mask)  # pruned exactly 0, no kept weight lands on 0
        assert set(info) == {"damp", "dead_inputs", "obs_loss"}
    if kind == "uneven":
        assert torch.equal(W[1], W0[1]) and (W[-2] == 0).all()  # keeps everything / nothing
    err = W - W0
    assert info["obs_loss"] == pytest.approx(float(((err @ damped_hessian(H)[0]) * err).sum()) / 2, rel=1e-5)


def test_rows_short_of_the_tolerance_are_solved_directly():
    """One iteration converges no row: all of them take the direct solve, with the same answer."""
    W0, _, H = layer(32, 64, seed=3)
    mask = uneven_mask(32, 64, seed=4)
    ref, capped = W0.clone(), W0.clone()
    lsq_update_(ref, H, mask, direct_max=0)
    lsq_update_(capped, H, mask, direct_max=0, max_iter=1)
    assert rel(capped, ref) < 1e-5 and rel(capped, direct64(W0, H, mask, 0.01)) < 1e-5


def test_chunking_does_not_change_the_refit():
    W0, _, H = layer(30, 48, seed=5)
    mask = uneven_mask(30, 48, seed=6)
    ref = W0.clone()
    lsq_update_(ref, H, mask)
    for kw in ({"rows_per_chunk": 3}, {"chunk_bytes": 1}):
        W = W0.clone()
        lsq_update_(W, H, mask, **kw)
        assert rel(W, ref) < 1e-5, kw


def test_dead_inputs_stay_decoupled_and_half_precision_weights_are_refit_in_fp32():
    W0, X, H = layer(12, 40, seed=7)
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    mask = uneven_mask(12, 40, seed=8)
    mask[:, 5] = False
    mask[0, 5] = True
    W = W0.clone()
    info = lsq_update_(W, H, mask)
    assert info["dead_inputs"] == 1
    assert torch.equal(W[1:, 5][~mask[1:, 5]], W0[1:, 5][~mask[1:, 5]])  # nothing flows into it
    assert rel(W, direct64(W0, H, mask, 0.01)) < 1e-5
    half = W0.to(torch.bfloat16)
    lsq_update_(half, H, mask)
    assert half.dtype == torch.bfloat16 and torch.equal(half == 0, mask)
    # the refit of the bf16 weights, computed in fp32 and rounded once to bf16 (~4e-3)
    assert rel(half.float(), direct64(W0.to(torch.bfloat16).float(), H, mask, 0.01)) < 1e-2


def test_the_loss_is_the_layer_error_without_damping():
    W0, X, H = layer(16, 48, n=1024, seed=9)
    mask = nm_mask(W0)
    W = W0.clone()
    info = lsq_update_(W, H, mask, percdamp=1e-7)
    assert info["obs_loss"] == pytest.approx(float(((W0 - W) @ X.T).square().sum()) / X.shape[0], rel=1e-3)
    assert rel(W, direct64(W0, H, mask, 1e-7)) < 1e-4  # kappa ~1e6 here: fp32 rounding, not the method
