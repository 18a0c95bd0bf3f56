"""Exact least-squares refit of each row's kept weights for a fixed mask (`reconstruct: lsq`)."""

from __future__ import annotations

import torch

from .obs import damped_hessian


@torch.no_grad()
def lsq_update_(
    weight: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    percdamp: float = 0.01,
    rows_per_chunk: int = 64,
    chunk_bytes: int = 1 << 30,
) -> dict:
    """Zero `mask` and set each row's kept weights to the exact least-squares optimum (damped H).

    Per row, with P pruned and K kept: w_K <- w_K + H_KK^-1 H_KP w_P, the minimiser of
    (w' - w)^T H (w' - w) subject to w'_P = 0. Unlike the greedy left-to-right OBS pass it re-optimises
    every kept weight against every pruned one, at the cost of one |K| x |K| Cholesky per row. Rows are
    batched in order of their kept count (so a batch pads little: shorter rows are padded with
    identity), at most `rows_per_chunk` rows and about `chunk_bytes` of fp32 systems per batch.
    """
    if weight.dim() != 2 or H.shape != (weight.shape[1], weight.shape[1]) or mask.shape != weight.shape:
        raise ValueError(
            f"shapes do not match: weight {tuple(weight.shape)}, Hessian {tuple(H.shape)}, mask {tuple(mask.shape)}"
        )
    Hd, dead, damp = damped_hessian(H.to(weight.device), percdamp)
    W = weight.detach().to(torch.float32).clone()
    mask = mask.to(device=W.device, dtype=torch.bool)
    rhs_all = (W * mask) @ Hd  # row r: H w_P (H symmetric)
    all_counts = (~mask).sum(dim=1)
    order = torch.argsort(all_counts, descending=True, stable=True)
    r0 = 0
    while r0 < W.shape[0]:
        k = int(all_counts[order[r0]])
        if k == 0:
            break  # the rest keep nothing: no system to solve
        n = max(1, min(rows_per_chunk, chunk_bytes // (3 * 4 * k * k)))  # A, its factor, the identity
        rows = order[r0 : r0 + n]
        r0 += n
        kept = ~mask[rows]
        counts = kept.sum(dim=1)
        idx = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :k]  # kept columns first
        valid = torch.arange(k, device=W.device) < counts.unsqueeze(1)
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        A = Hd[idx.unsqueeze(2), idx.unsqueeze(1)]
        eye = torch.eye(k, device=W.device, dtype=A.dtype).expand_as(A)
        A = torch.where(pair, A, eye)
        b = rhs_all[rows].gather(1, idx) * valid
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):  # a sub-matrix of a PD matrix is PD: only rounding gets here
            L = torch.linalg.cholesky(A + damp * torch.eye(k, device=W.device, dtype=A.dtype))
        delta = torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2) * valid
        W[rows] = W[rows].scatter_add(1, idx, delta)
    W.masked_fill_(mask, 0)
    dW = W - weight.detach().to(torch.float32)
    loss = float(((dW @ Hd) * dW).sum()) / 2
    weight.copy_(W.to(weight.dtype))
    weight.masked_fill_(mask, 0)
    return {"damp": damp, "dead_inputs": int(dead.sum()), "obs_loss": loss}
