"""Exact least-squares refit of each row's kept weights for a fixed mask (`reconstruct: lsq`).

Per row, with P pruned and K kept, the minimiser of (w' - w)^T H (w' - w) subject to w'_P = 0 is
w'_K = w_K + H_KK^-1 H_KP w_P. The same optimum reads, through the inverse G = H^-1 and the
constraints' Lagrange multipliers l: w' = w - G[:, P] l with G_PP l = w_P. Each row has its own
sub-matrix, so a direct solve costs one min(|K|, |P|)^3 / 3 factorisation per row: 10-20x an OBS pass
on SmolLM2's layers at 50%. Instead, l is found by conjugate gradients on G_PP for all rows at once:
an iteration is one [rows, in] x [in, in] matmul with the shared G, its product masked to each row's
P, with G scaled to unit diagonal (Jacobi), which leaves ~20-35 iterations to a relative residual of
`tol` = 1e-5 on SmolLM2's Hessians (scripts/bench_lsq.py). A row leaves the batch once converged.
Rows whose smaller side is small (min(|K|, |P|) <= in / 6, e.g. the extremes of a global mask) are
cheaper to solve directly on that side, and so is any row still short of `tol` after `max_iter`
iterations (only on a near-singular Hessian): the answer never depends on the iteration converging.
The result equals a direct fp32 solve to rounding (~1e-6 relative on the weights where H is
well conditioned; both sit ~kappa(H) x 1e-8 from an fp64 solve).
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
        if n_done * 8 >= active.numel():  # drop converged rows once the copy buys a smaller matmul
            x[active[done]] = xa[done]
            k = ~done
            active, xa, r, p, rr, thr, m = (t[k] for t in (active, xa, r, p, rr, thr, m))
            Ap = torch.empty_like(r)
        torch.mm(p, Gs, out=Ap)
        Ap.mul_(m)
        pAp = torch.linalg.vecdot(p, Ap)
        # rows that converged but are still in the batch keep refining; p = 0 (b = 0) stays put
        alpha = torch.where(pAp > 0, rr / pAp, torch.zeros_like(rr)).unsqueeze(1)
        xa.addcmul_(p, alpha)
        r.addcmul_(Ap, alpha, value=-1)
        rr_new = torch.linalg.vecdot(r, r)
        p.mul_(torch.where(rr > 0, rr_new / rr, torch.zeros_like(rr)).unsqueeze(1)).add_(r)
        rr = rr_new
    if xa is not x:
        x[active] = xa
    unconverged = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    unconverged[active[rr > thr]] = True
    return x, unconverged


def solve_principal(
    M: torch.Tensor, sel: torch.Tensor, b: torch.Tensor, damp: float, chunk_bytes: int = 1 << 30
) -> torch.Tensor:
    """Per row r, x_S = (M_SS)^-1 b_S with S = sel[r] (x = 0 elsewhere), M symmetric positive definite.

    Rows are batched in order of |S| (little padding: shorter rows are padded with identity), at most
    64 rows and about `chunk_bytes` of systems per batch.
    """
    x = torch.zeros_like(b)
    counts = sel.sum(dim=1)
    order = torch.argsort(counts, descending=True, stable=True)
    r0 = 0
    while r0 < sel.shape[0]:
        k = int(counts[order[r0]])
        if k == 0:
            break  # the rest select nothing
        n = max(1, min(64, chunk_bytes // (3 * 4 * k * k)))  # A, its factor, the identity
        rows = order[r0 : r0 + n]
        r0 += n
        idx = torch.argsort((~sel[rows]).to(torch.int8), dim=1, stable=True)[:, :k]  # selected first
        valid = torch.arange(k, device=M.device) < counts[rows].unsqueeze(1)
        A = M[idx.unsqueeze(2), idx.unsqueeze(1)]
        eye = torch.eye(k, device=M.device, dtype=M.dtype).expand_as(A)
        A = torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), A, eye)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):  # a sub-matrix of a PD matrix is PD: only rounding gets here
            L = torch.linalg.cholesky(A + damp * eye)
        y = torch.cholesky_solve((b[rows].gather(1, idx) * valid).unsqueeze(2), L).squeeze(2) * valid
        x[rows] = torch.zeros_like(x[rows]).scatter_(1, idx, y)
    return x


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
    direct_max: int | None = None,
) -> dict:
    """Zero `mask` and set each row's kept weights to the exact least-squares optimum (damped H).

    Rows iterate together, at most `rows_per_chunk` (default: all) and about `chunk_bytes` of fp32
    buffers (four [rows, in] tensors) at a time; the chunking changes the result only within `tol`.
    `max_iter` (default: in_features + 10) bounds the iterations before a row is solved directly;
    rows with min(|K|, |P|) <= `direct_max` (default: in_features // 6, where a direct solve costs
    less than the iteration: measured break-even ~in / 5) are solved directly.
    """
    if weight.dim() != 2 or H.shape != (weight.shape[1], weight.shape[1]) or mask.shape != weight.shape:
        raise ValueError(
            f"shapes do not match: weight {tuple(weight.shape)}, Hessian {tuple(H.shape)}, mask {tuple(mask.shape)}"
        )
    Hd, dead, damp = damped_hessian(H.to(weight.device), percdamp)
    W0 = weight.detach().to(torch.float32)
    mask = mask.to(device=W0.device, dtype=torch.bool)
    cols = W0.shape[1]
    G = _inverse(Hd, damp)
    s = G.diagonal().rsqrt()
    Gs = G * s.unsqueeze(1) * s.unsqueeze(0)  # unit diagonal: Jacobi-preconditioned CG, one matmul
    n_p = mask.sum(dim=1)
    n_k = cols - n_p
    solve = (n_p > 0) & (n_k > 0)  # a row that keeps everything or nothing needs no solve
    small = torch.minimum(n_p, n_k) <= (cols // 6 if direct_max is None else direct_max)
    rows = torch.nonzero(solve & ~small).squeeze(1)
    lam = torch.zeros_like(W0)
    to_kept = solve & small & (n_k <= n_p)  # solved directly on K (H_KK) ...
    to_pruned = solve & small & (n_k > n_p)  # ... or on P (G_PP)
    n = max(1, min(rows_per_chunk or rows.numel() or 1, chunk_bytes // (4 * 4 * cols)))
    for i in range(0, rows.numel(), n):
        chunk = rows[i : i + n]
        m = mask[chunk].to(torch.float32)
        x, unconverged = cg_multipliers(Gs, W0[chunk] * s * m, m, tol, max_iter or cols + 10)
        lam[chunk] = x * s  # back from the scaled system: l = D^-1/2 x
        to_kept[chunk[unconverged]] = True
        lam[chunk[unconverged]] = 0
    if bool(to_pruned.any()):
        idx = torch.nonzero(to_pruned).squeeze(1)
        lam[idx] = solve_principal(G, mask[idx], W0[idx] * mask[idx], damp, chunk_bytes)
    W = W0 - lam @ G  # w' = w - G[:, P] l on the kept entries; the pruned ones are set to 0 below
    if bool(to_kept.any()):
        idx = torch.nonzero(to_kept).squeeze(1)
        W[idx] += solve_principal(Hd, ~mask[idx], (W0[idx] * mask[idx]) @ Hd, damp, chunk_bytes)
    W.masked_fill_(mask, 0)
    dW = W - W0
    loss = float(((dW @ Hd) * dW).sum()) / 2
    weight.copy_(W.to(weight.dtype))
    weight.masked_fill_(mask, 0)
    return {"damp": damp, "dead_inputs": int(dead.sum()), "obs_loss": loss}
