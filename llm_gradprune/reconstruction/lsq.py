"""Exact least-squares refit of each row's kept weights for a fixed mask (`reconstruct: lsq`).

Per row, with P pruned and K kept, the minimiser of (w' - w)^T H (w' - w) subject to w'_P = 0 is
w'_K = w_K + H_KK^-1 H_KP w_P. The same optimum reads, through the inverse G = H^-1 and the
constraints' Lagrange multipliers l: w' = w - G[:, P] l with G_PP l = w_P. Solved directly, either
form costs one |K|^3 or |P|^3 factorisation per row (each row has its own sub-matrix), 10-20x an OBS
pass on SmolLM2's layers. Here l is found by conjugate gradients on G_PP for all rows at once: an
iteration is one [rows, in] x [in, in] matmul with the shared G (its product masked to each row's P),
G being scaled to unit diagonal (Jacobi), which leaves ~15-45 iterations to a relative residual of
`tol` = 1e-5 on SmolLM2's Hessians (measured: scripts/bench_lsq.py). A row leaves the batch once it
has converged. The result equals a direct solve to fp32 rounding (a few 1e-6 relative on the weights);
a row still short of `tol` after `max_iter` iterations (only on a near-singular Hessian) is solved
directly, so the answer never depends on the iteration converging.
"""

from __future__ import annotations

import torch

from .obs import damped_hessian


def _inverse(Hd: torch.Tensor, damp: float) -> torch.Tensor:
    """(Hd)^-1 by Cholesky; Hd is damped positive definite, so only rounding can make it fail, and
    then one more `damp` on the diagonal is used (as the per-row solves always did)."""
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        L = torch.linalg.cholesky(Hd + damp * torch.eye(Hd.shape[0], device=Hd.device, dtype=Hd.dtype))
    return torch.cholesky_inverse(L)


def cg_multipliers(
    Gs: torch.Tensor, b: torch.Tensor, m: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (Gs)_PP x = b_P for every row at once (P: where row `m` is 1; b is 0 elsewhere).

    Conjugate gradients, one masked matmul per iteration; a row stops when ||r|| <= tol ||b||.
    Returns (x [rows, in], bool [rows]: the rows that did not converge within `max_iter`).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    rr = torch.linalg.vecdot(r, r)
    thr = rr * tol**2
    active = torch.arange(b.shape[0], device=b.device)
    p, Ap = r.clone(), torch.empty_like(r)
    xa = x  # the active rows' iterate (x itself until the first row leaves)
    for _ in range(max_iter):
        done = rr <= thr
        n_done = int(done.sum())
        if n_done == active.numel():
            break
        # drop converged rows once enough have left to make the copy worth it (a smaller matmul)
        if n_done and (n_done * 8 >= active.numel()):
            x[active[done]] = xa[done]
            keep = ~done
            active, xa, r, p, rr, thr, m = (
                active[keep],
                xa[keep],
                r[keep],
                p[keep],
                rr[keep],
                thr[keep],
                m[keep],
            )
            Ap = torch.empty_like(r)
        torch.mm(p, Gs, out=Ap)
        Ap.mul_(m)
        pAp = torch.linalg.vecdot(p, Ap)
        # rows that converged but are still in the batch keep refining; p = 0 (b = 0) stays put
        alpha = torch.where(pAp > 0, rr / pAp, torch.zeros_like(rr)).unsqueeze(1)
        xa.addcmul_(p, alpha)
        r.addcmul_(Ap, alpha, value=-1)
        rr_new = torch.linalg.vecdot(r, r)
        beta = torch.where(rr > 0, rr_new / rr, torch.zeros_like(rr))
        p.mul_(beta.unsqueeze(1)).add_(r)
        rr = rr_new
    if xa is not x:
        x[active] = xa
    unconverged = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    unconverged[active[rr > thr]] = True
    return x, unconverged


def _direct_rows_(
    W: torch.Tensor, Hd: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, damp: float
) -> None:
    """The fallback: w_K += H_KK^-1 H_KP w_P for each of `rows`, one Cholesky each (few rows)."""
    for r in rows.tolist():
        keep, drop = ~mask[r], mask[r]
        A = Hd[keep][:, keep]
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            L = torch.linalg.cholesky(A + damp * torch.eye(A.shape[0], device=A.device, dtype=A.dtype))
        rhs = Hd[keep][:, drop] @ W[r, drop]
        W[r, keep] += torch.cholesky_solve(rhs.unsqueeze(1), L).squeeze(1)


@torch.no_grad()
def lsq_update_(
    weight: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    percdamp: float = 0.01,
    tol: float = 1e-5,
    max_iter: int | None = None,
    rows_per_chunk: int | None = None,
    chunk_bytes: int = 1 << 30,
) -> dict:
    """Zero `mask` and set each row's kept weights to the exact least-squares optimum (damped H).

    Rows are solved together, at most `rows_per_chunk` (default: all) and about `chunk_bytes` of fp32
    iteration buffers (four [rows, in] tensors) at a time; the chunking does not change the result
    beyond `tol`. `max_iter` (default: in_features + 10) bounds the iterations before a direct solve.
    """
    if weight.dim() != 2 or H.shape != (weight.shape[1], weight.shape[1]) or mask.shape != weight.shape:
        raise ValueError(
            f"shapes do not match: weight {tuple(weight.shape)}, Hessian {tuple(H.shape)}, mask {tuple(mask.shape)}"
        )
    Hd, dead, damp = damped_hessian(H.to(weight.device), percdamp)
    W0 = weight.detach().to(torch.float32)
    mask = mask.to(device=W0.device, dtype=torch.bool)
    G = _inverse(Hd, damp)
    s = G.diagonal().rsqrt()
    Gs = G * s.unsqueeze(1) * s.unsqueeze(0)  # unit diagonal: Jacobi-preconditioned CG, one matmul
    pruned = mask.sum(dim=1)
    rows = torch.nonzero((pruned > 0) & (pruned < mask.shape[1])).squeeze(1)  # the others need no solve
    lam = torch.zeros_like(W0)
    slow = []
    cols = W0.shape[1]
    n = max(1, min(rows_per_chunk or rows.numel() or 1, chunk_bytes // (4 * 4 * cols)))
    for i in range(0, rows.numel(), n):
        chunk = rows[i : i + n]
        m = mask[chunk].to(torch.float32)
        x, unconverged = cg_multipliers(Gs, W0[chunk] * s * m, m, tol, max_iter or cols + 10)
        lam[chunk] = x * s  # back from the scaled system: l = D^-1/2 x
        slow.append(chunk[unconverged])
    W = W0 - lam @ G  # w' = w - G[:, P] l: the kept entries; the pruned ones are set to 0 below
    rows_left = torch.cat(slow) if slow else rows[:0]
    if rows_left.numel():
        W[rows_left] = W0[rows_left]
        _direct_rows_(W, Hd, mask, rows_left, damp)
    W.masked_fill_(mask, 0)
    dW = W - W0
    loss = float(((dW @ Hd) * dW).sum()) / 2
    weight.copy_(W.to(weight.dtype))
    weight.masked_fill_(mask, 0)
    return {"damp": damp, "dead_inputs": int(dead.sum()), "obs_loss": loss}
