"""Compensation for removed input columns of a projection: least-squares refit and mean bias (pure maths).

Removing MLP channels or heads removes input columns P of the consuming projection (down_proj, o_proj);
its kept columns K can absorb part of what P did. Over calibration inputs x with second moment
S = E[x x^T] and mean mu, the output error of W'_K (and an added bias b) is E||W x - W'_K x_K - b||^2.

- lsq: W'_K = W_K + W_P S_PK S_KK^-1, the optimum without bias. Every row shares the same columns, so
  one Cholesky of the damped S_KK serves all rows; damping is `reconstruction.obs.damped_hessian`'s,
  so the result equals the per-row `reconstruction.lsq.lsq_update_` for this column mask, at the cost of
  one solve instead of one per row.
- mean bias (FLAP): b = W_P mu_P, the removed columns' mean output. With lsq too, the optimum uses the
  covariance C = S - mu mu^T in place of S, and b = W_P mu_P + (W_K - W'_K) mu_K.
"""

from __future__ import annotations

import torch

from ..reconstruction.obs import damped_hessian


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return torch.nonzero(mask).squeeze(1)


@torch.no_grad()
def refit_columns(
    W: torch.Tensor,
    second: torch.Tensor,
    keep: torch.Tensor,
    *,
    mean: torch.Tensor | None = None,
    lsq: bool = True,
    bias: bool = False,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(W' [out, |K|] fp32, added bias [out] or None, info) for keeping input columns `keep` of W [out, n].

    `second` is E[x x^T] [n, n] of the inputs (a `Hessians` sum gives 2 E[x x^T]: halve it), `mean` E[x]
    (needed with `bias`). info: relative output error of plain removal and of the result."""
    W = W.detach().to(torch.float32)
    S = second.detach().to(device=W.device, dtype=torch.float32)
    n = W.shape[1]
    if S.shape != (n, n):
        raise ValueError(f"second moment {tuple(S.shape)} does not match weight {tuple(W.shape)}")
    if bias and mean is None:
        raise ValueError("a mean bias needs the inputs' mean")
    mu = None if mean is None else mean.detach().to(device=W.device, dtype=torch.float32)
    drop = complement(keep, n)
    C = S - torch.outer(mu, mu) if bias else S
    Wk = W[:, keep]
    damp = 0.0
    if lsq and drop.numel() and keep.numel():
        Hd, _, damp = damped_hessian(C, percdamp)
        A = Hd[keep][:, keep]
        rhs = Hd[keep][:, drop] @ W[:, drop].T  # [K, out]
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:  # a principal block of a positive definite matrix is one: rounding only
            L = torch.linalg.cholesky(A + damp * torch.eye(A.shape[0], device=A.device))
        Wk = Wk + torch.cholesky_solve(rhs, L).T
    b = None
    if bias:
        b = W[:, drop] @ mu[drop] + (W[:, keep] - Wk) @ mu[keep]
    full = torch.zeros_like(W)
    full[:, keep] = Wk
    info = {
        "removed_error": relative_error(W, _zero_columns(W, drop), None, S, mu),
        "error": relative_error(W, full, b, S, mu),
        "damp": damp,
    }
    return Wk, b, info


def _zero_columns(W: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    out = W.clone()
    out[:, drop] = 0
    return out


def relative_error(
    W: torch.Tensor,
    W_new: torch.Tensor,
    b: torch.Tensor | None,
    second: torch.Tensor,
    mean: torch.Tensor | None,
) -> float:
    """E||W x - W_new x - b||^2 / E||W x||^2 from the inputs' second moment (and mean, with a bias)."""
    D = W - W_new
    err = (D @ second * D).sum()
    if b is not None:
        err = err - 2 * b @ (D @ mean) + b @ b
    ref = (W @ second * W).sum()
    return float(err / ref) if float(ref) > 0 else 0.0
