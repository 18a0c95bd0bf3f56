"""OBS reconstruction maths on single linear layers, against hand-computed and least-squares numbers."""

import pytest
import torch
from torch import nn

from llm_gradprune.calibration.hessians import Hessians, hessian_bytes
from llm_gradprune.reconstruction.lsq import lsq_update_
from llm_gradprune.reconstruction.obs import obs_update_, prepare_hessian, sparsegpt_


def layer(out=8, inp=16, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, inp, generator=g) @ torch.randn(inp, inp, generator=g)  # correlated inputs
    W = torch.randn(out, inp, generator=g)
    return W, X, 2 * X.T @ X / n


def out_err(W0, W, X):
    return float(((W0 - W) @ X.T).norm())


def least_squares(W0, X, mask):
    """Per row: kept weights minimising ||X (w0 - w)|| with the pruned ones fixed at 0."""
    W = torch.zeros_like(W0, dtype=torch.float64)
    Xd, W0d = X.double(), W0.double()
    for r in range(W0.shape[0]):
        keep = ~mask[r]
        W[r, keep] = torch.linalg.lstsq(Xd[:, keep], (Xd @ W0d[r]).unsqueeze(1)).solution.squeeze(1)
    return W.float()


def test_hessian_accumulator_matches_hand_sum_and_shares_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(2, 1)

        def forward(self, x):
            return self.c(self.a(x) + self.b(x))

    net = Two()
    hs = Hessians({"a": net.a, "b": net.b, "c": net.c}).attach()
    x1 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    x2 = torch.tensor([[[3.0, 0.0, 1.0]]])  # 3-D input: tokens are all leading dims
    with torch.no_grad():
        net(x1), net(x2)
    hs.detach()
    X = torch.cat([x1, x2[0]])
    expected = 2 * X.T @ X / 3  # [[20, 4, 6], [4, 10, -2], [6, -2, 4]] / 3
    assert torch.allclose(hs.hessian("a"), torch.tensor([[20.0, 4, 6], [4, 10, -2], [6, -2, 4]]) / 3)
    assert torch.allclose(hs.hessian("a"), expected)
    assert hs.owner("b") == "a" and torch.equal(hs.hessian("b"), hs.hessian("a"))  # one product for both
    assert hs.hessian("c").shape == (2, 2) and hs.tokens["c"] == 3
    assert hs.nbytes("a") == hessian_bytes(3) == 36


def test_obs_beats_masking_and_is_exact_when_pruned_columns_come_first():
    W0, X, H = layer(out=32, inp=64, n=1024)
    mask = W0.abs() < W0.abs().median(dim=1, keepdim=True).values  # magnitude, per row
    W = W0.clone()
    info = obs_update_(W, H, mask, blocksize=16, percdamp=0.01)
    masked, obs, ls = (out_err(W0, w, X) for w in (W0.masked_fill(mask, 0), W, least_squares(W0, X, mask)))
    # greedy left-to-right OBS: between the optimum of the kept weights and no compensation at all
    assert ls < obs < 0.95 * masked
    # its own loss estimate is the layer error ||dW X||^2 / n (up to the 1% damping)
    assert info["obs_loss"] == pytest.approx(obs**2 / X.shape[0], rel=0.05)

    W0, X, H = layer()
    prefix = torch.zeros(W0.shape, dtype=torch.bool)
    prefix[:, :6] = True  # every pruned weight precedes the kept ones: OBS = least squares exactly
    prefix[:4, 6] = True
    W = W0.clone()
    obs_update_(W, H, prefix, blocksize=4, percdamp=1e-8)
    assert torch.allclose(W, least_squares(W0, X, prefix), atol=1e-3, rtol=1e-3)


def test_lsq_matches_a_direct_least_squares_solve_per_row():
    W0, X, H = layer(out=9, inp=24)
    mask = (
        torch.rand(W0.shape, generator=torch.Generator().manual_seed(3))
        < torch.linspace(0.2, 0.8, 9)[:, None]
    )
    W = W0.clone()
    info = lsq_update_(W, H, mask, percdamp=1e-9, rows_per_chunk=4)  # uneven kept counts, padded
    assert torch.allclose(W, least_squares(W0, X, mask), atol=2e-3, rtol=1e-3)
    assert torch.equal(W == 0, mask)
    assert info["obs_loss"] == pytest.approx(out_err(W0, W, X) ** 2 / X.shape[0], rel=1e-3)
    W_obs = W0.clone()
    obs_update_(W_obs, H, mask, blocksize=8, percdamp=1e-9)
    assert out_err(W0, W, X) <= out_err(W0, W_obs, X)


def test_lsq_batches_rows_by_kept_count_within_a_memory_budget():
    """One row per batch (a tiny byte budget), rows that keep nothing and rows that keep everything give
    the same refit as the default batching. Each batching is within the iteration's `tol` of the optimum,
    so they are compared at a tolerance far below the 1e-5 asserted (at the default 1e-5 two refits can
    differ by ~3e-5 on this ill-conditioned layer, depending on the CPU's BLAS kernels)."""
    W0, X, H = layer(out=10, inp=24)
    mask = torch.rand(W0.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[2] = True  # keeps nothing
    mask[7] = False  # keeps everything: no change at all
    ref, tiny = W0.clone(), W0.clone()
    lsq_update_(ref, H, mask, tol=1e-8)
    lsq_update_(tiny, H, mask, chunk_bytes=1, tol=1e-8)
    torch.testing.assert_close(tiny, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ref == 0, mask | (W0 == 0)) and (ref[2] == 0).all() and torch.equal(ref[7], W0[7])


def test_mask_is_never_changed():
    W0, X, H = layer(out=12, inp=32)
    mask = torch.rand(W0.shape, generator=torch.Generator().manual_seed(2)) < 0.6
    for update in (lambda w: obs_update_(w, H, mask, blocksize=8), lambda w: lsq_update_(w, H, mask)):
        W = W0.clone()
        update(W)
        assert torch.equal(W == 0, mask)  # pruned exactly 0, every kept weight still non-zero
        assert not torch.equal(W[~mask], W0[~mask])  # and the kept ones did move


def test_sparsegpt_nm_groups_stay_valid_and_beat_magnitude():
    W0, X, H = layer(out=16, inp=32)
    W = W0.clone()
    mask, _ = sparsegpt_(W, H, nm=(2, 4), blocksize=8)
    assert (mask.reshape(-1, 4).sum(1) == 2).all()
    assert ((W.reshape(-1, 4) != 0).sum(1) == 2).all()
    mag = W0.abs().reshape(-1, 4).argsort(1)[:, :2]
    mag_mask = torch.zeros(W0.numel() // 4, 4, dtype=torch.bool).scatter_(1, mag, True).view_as(W0)
    assert out_err(W0, W, X) < out_err(W0, W0.masked_fill(mag_mask, 0), X)

    W = W0.clone()  # a given N:M mask stays N:M after OBS updates
    obs_update_(W, H, mag_mask, blocksize=8)
    assert ((W.reshape(-1, 4) != 0).sum(1) == 2).all() and torch.equal(W == 0, mag_mask)


def test_sparsegpt_unstructured_exact_count_per_block():
    W0, X, H = layer(out=10, inp=24)
    W = W0.clone()
    mask, info = sparsegpt_(W, H, 0.5, blocksize=8)
    assert [int(mask[:, i : i + 8].sum()) for i in (0, 8, 16)] == [40, 40, 40]
    assert torch.equal(W == 0, mask) and info["dead_inputs"] == 0


def test_dead_inputs_are_pruned_first_and_get_no_update():
    W0, X, H = layer(out=6, inp=8)
    X[:, 3] = 0
    H = 2 * X.T @ X / X.shape[0]
    W = W0.clone()
    mask, info = sparsegpt_(W, H, 0.25, blocksize=8)
    assert info["dead_inputs"] == 1 and mask[:, 3].all()  # free to prune: it never reaches the output
    keep = torch.zeros_like(mask)
    keep[:, 0] = True
    W = W0.clone()
    obs_update_(W, H, keep, blocksize=4)
    assert torch.equal(W[:, 3], W0[:, 3])  # the dead column is decoupled from the others


def test_failed_cholesky_retries_with_more_damping():
    H = torch.diag(torch.tensor([1.0, -0.2]))  # not positive definite at 1% damping
    with pytest.warns(UserWarning, match="Cholesky"):
        U, dead, damp = prepare_hessian(H, 0.01)
    assert damp == pytest.approx(0.004 * 100)
    assert torch.allclose(U.T @ U, torch.linalg.inv(H + damp * torch.eye(2)), atol=1e-5)
    assert not dead.any()


def test_upper_cholesky_factor_gives_conditional_inverse_diagonal():
    _, _, H = layer(inp=6)
    U, _, damp = prepare_hessian(H, 0.01)
    Hd = H + damp * torch.eye(6)
    for j in range(6):  # U_jj^2 = [H_{j:, j:}^-1]_00: the OBS denominator once columns < j are fixed
        assert float(U[j, j] ** 2) == pytest.approx(float(torch.linalg.inv(Hd[j:, j:])[0, 0]), rel=1e-3)


def test_bad_shapes_are_refused():
    W0, _, H = layer()
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_(W0.clone(), H, nm=(2, 4), blocksize=6)
    with pytest.raises(ValueError, match="Hessian shape"):
        obs_update_(W0.clone(), H[:4, :4], torch.zeros_like(W0, dtype=torch.bool))
