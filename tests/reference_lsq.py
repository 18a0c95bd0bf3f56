"""Reference solutions the least-squares refit is checked against (tests/test_lsq_refit.py) and timed
against (scripts/bench_lsq.py): a per-row fp64 solve of the damped problem, and the per-row Cholesky
refit the library had before issue 17, kept verbatim."""

from __future__ import annotations

import torch

from llm_gradprune.reconstruction.obs import damped_hessian


def direct64(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Per-row fp64 solve of the same damped problem: the ground truth both refits are measured against."""
    Hd = damped_hessian(H, percdamp)[0].double()
    out = W.double().clone()
    for r in range(W.shape[0]):
        keep, drop = ~mask[r], mask[r]
        if keep.any() and drop.any():
            out[r, keep] += torch.linalg.solve(Hd[keep][:, keep], Hd[keep][:, drop] @ out[r, drop])
        out[r, drop] = 0
    return out.float()


@torch.no_grad()
def old_lsq_update_(weight, H, mask, percdamp=0.01, rows_per_chunk=64, chunk_bytes=1 << 30) -> dict:
    """The refit before issue 17: one |K| x |K| Cholesky per row, rows batched by kept count and padded
    with identity."""
    Hd, dead, damp = damped_hessian(H.to(weight.device), percdamp)
    W = weight.detach().to(torch.float32).clone()
    mask = mask.to(device=W.device, dtype=torch.bool)
    rhs_all = (W * mask) @ Hd
    all_counts = (~mask).sum(dim=1)
    order = torch.argsort(all_counts, descending=True, stable=True)
    r0 = 0
    while r0 < W.shape[0]:
        k = int(all_counts[order[r0]])
        if k == 0:
            break
        n = max(1, min(rows_per_chunk, chunk_bytes // (3 * 4 * k * k)))
        rows = order[r0 : r0 + n]
        r0 += n
        kept = ~mask[rows]
        counts = kept.sum(dim=1)
        idx = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :k]
        valid = torch.arange(k, device=W.device) < counts.unsqueeze(1)
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        A = Hd[idx.unsqueeze(2), idx.unsqueeze(1)]
        eye = torch.eye(k, device=W.device, dtype=A.dtype).expand_as(A)
        A = torch.where(pair, A, eye)
        b = rhs_all[rows].gather(1, idx) * valid
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            L = torch.linalg.cholesky(A + damp * torch.eye(k, device=W.device, dtype=A.dtype))
        delta = torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2) * valid
        W[rows] = W[rows].scatter_add(1, idx, delta)
    W.masked_fill_(mask, 0)
    dW = W - weight.detach().to(torch.float32)
    loss = float(((dW @ Hd) * dW).sum()) / 2
    weight.copy_(W.to(weight.dtype))
    weight.masked_fill_(mask, 0)
    return {"damp": damp, "dead_inputs": int(dead.sum()), "obs_loss": loss}
