"""Weight reconstruction: Optimal Brain Surgeon updates of a layer from its Hessian (SparseGPT).

For a linear layer y = W x the layer-wise loss of a change dW, over calibration inputs X [in, n], is
||dW X||^2 = sum_rows dw H dw^T / 2 with H = 2 X X^T / n (fp32). Setting weight w_q of a row to 0 and
moving the rest of the row optimally changes it by -w_q / [H^-1]_qq * H^-1[q, :] at a loss of
w_q^2 / [H^-1]_qq (Hassibi & Stork, 1993). SparseGPT (Frantar & Alistarh, 2023) makes this affordable
for every row at once by eliminating columns left to right: after column j is fixed, the inverse
Hessian of the columns still free is read off the upper Cholesky factor U of H^-1 (H^-1 = U^T U), row
j of U being H_{j:,j:}^-1[0, :] / sqrt(H_{j:,j:}^-1[0, 0]). So one factorisation serves every row,
and an OBS step on column j is `W[:, j:] -= ((w - q) / U_jj) outer U[j, j:]`. Columns are processed in
blocks (`blocksize`) whose updates to later columns are applied lazily in one matmul.

Two entry points share that loop:
- `sparsegpt_`: chooses the mask inside each block adaptively, by the current OBS saliency
  w^2 / U_jj^2 (optionally times a prior score, e.g. a gradient term), unstructured or N:M;
- `obs_update_`: keeps a mask chosen by any criterion and applies the same compensation.
Pruned weights end exactly 0 and a given mask is never changed. The result is the greedy
left-to-right OBS solution: exact when every pruned column of a row precedes its kept ones, close to
(never better than) a per-row least-squares solve otherwise.

Memory: one fp32 [in, in] Hessian per distinct layer input (in^2 x 4 bytes), plus a few copies of it
and of the weight while a layer is reconstructed.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..selection.select import num_to_prune


def damped_hessian(
    H: torch.Tensor, percdamp: float = 0.01, add: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H + damp I with dead channels decoupled, dead mask, damp); `add=False` leaves the diagonal."""
    H = H.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1
    mean_diag = float(torch.diag(H).mean())
    damp = percdamp * mean_diag if mean_diag > 0 else percdamp
    if add:
        H.diagonal().add_(damp)
    return H, dead, damp


def prepare_hessian(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U, dead, damp): upper Cholesky factor of (H + damp I)^-1, dead input channels, damping used.

    Dead channels (H_jj == 0: an input that is always zero) get H_jj = 1, which decouples them: no
    update ever flows into or out of them. Damping starts at `percdamp` x mean diagonal; if a Cholesky
    fails it is multiplied by 10 (up to 5 times) with a warning.
    """
    damp = None
    for attempt in range(6):
        # one working copy at a time: the damped copy is dropped once factored, the factor once
        # inverted (peak: the caller's H and two [in, in] copies)
        Hd, dead, first = damped_hessian(H, percdamp, add=False)
        damp = first if damp is None else damp
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            L = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(L, upper=True)
            del L
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, dead, damp
            del U
        if attempt == 5:
            break
        warnings.warn(
            f"Cholesky of the layer Hessian failed with damping {damp:.3g}: retrying with {damp * 10:.3g}",
            stacklevel=2,
        )
        damp *= 10
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp:.3g}")


def _block_mask_unstructured(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly round(sparsity * numel) lowest scores of the block (ties: first in row-major order)."""
    k = num_to_prune(sparsity, score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        order = torch.argsort(score.reshape(-1), stable=True)
        mask[order[:k]] = True
    return mask.view_as(score)


@contextlib.contextmanager
def _one_thread_on_cpu(t: torch.Tensor):
    """The column loop is thousands of small ops: on CPU, extra threads only add synchronisation
    (measured 6-10x slower with 2 threads on a busy 2-core machine), so run it on one."""
    if t.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _obs_columns(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    blocksize: int,
    mask: torch.Tensor | None = None,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    prior: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The shared column loop on an fp32 [rows, cols] copy W (changed in place). Returns (mask, loss).

    With `mask` given it is followed; otherwise it is chosen per block from the current saliency.
    `loss` is sum of the OBS losses (w - q)^2 / U_jj^2 / 2, the layer-wise error estimate.
    """
    rows, cols = W.shape
    chosen = mask is None
    if chosen:
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros(rows, dtype=torch.float32, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        M1 = mask[:, i1:i2]
        if chosen and nm is None:
            score = W1.square() / d.square()
            if prior is not None:
                score = score * prior[:, i1:i2]
            if dead is not None:
                score[:, dead[i1:i2]] = 0  # an input that is always zero costs nothing to prune
            M1 = _block_mask_unstructured(score, sparsity)
            mask[:, i1:i2] = M1
        keep = None if chosen else (~M1).to(W1.dtype)
        for i in range(i2 - i1):
            if chosen and nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                score = W1[:, g].square() / d[g].square()
                if prior is not None:
                    score = score * prior[:, i1 + i : i1 + i + nm[1]]
                if dead is not None:
                    score[:, dead[i1 + i : i1 + i + nm[1]]] = 0
                drop = torch.topk(score, nm[1] - nm[0], dim=1, largest=False, sorted=False).indices
                M1[:, g].scatter_(1, drop, True)
            # err = (w - q) / U_jj with q = w where kept and 0 where pruned
            if keep is None:
                err = W1[:, i].masked_fill(~M1[:, i], 0).div_(d[i])
            else:
                err = W1[:, i].sub(W1[:, i] * keep[:, i]).div_(d[i])
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        W1.masked_fill_(M1, 0)  # exactly 0 where pruned, whatever rounding the update left
        loss += Err1.square().sum(dim=1) / 2
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return mask, float(loss.sum())


def _check(weight: torch.Tensor, H: torch.Tensor, blocksize: int, nm: tuple[int, int] | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"reconstruction needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if H.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight shape {tuple(weight.shape)}")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize {blocksize!r} must be a positive integer")
    if nm is not None:
        if blocksize % nm[1]:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]} for N:M")
        if weight.shape[1] % nm[1]:
            raise ValueError(f"in_features {weight.shape[1]} is not a multiple of M={nm[1]}")


@torch.no_grad()
def sparsegpt_(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """SparseGPT in place on a [out, in] weight: adaptive mask + OBS updates. Returns (mask, info).

    Unstructured: each block of `blocksize` columns prunes exactly round(sparsity x its size) weights of
    lowest saliency w^2 / U_jj^2 (over all rows of the block, as in the paper). N:M: in each group of M
    columns each row prunes its M - N lowest, chosen when the group is reached, i.e. after the updates
    of the columns before it. `prior` (same shape as the weight, >= 0) multiplies the saliency.
    """
    _check(weight, H, blocksize, nm)
    U, dead, damp = prepare_hessian(H.to(weight.device), percdamp)
    W = weight.detach().to(torch.float32).clone()
    with _one_thread_on_cpu(W):
        mask, loss = _obs_columns(W, U, blocksize=blocksize, sparsity=sparsity, nm=nm, prior=prior, dead=dead)
    weight.copy_(W.to(weight.dtype))
    weight.masked_fill_(mask, 0)
    return mask, {"damp": damp, "dead_inputs": int(dead.sum()), "obs_loss": loss}


@torch.no_grad()
def obs_update_(
    weight: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> dict:
    """Zero `mask` (True = pruned) in a [out, in] weight and move the kept weights to compensate.

    The mask is followed exactly: pruned entries end exactly 0, kept ones only change value.
    """
    _check(weight, H, blocksize, None)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    U, dead, damp = prepare_hessian(H.to(weight.device), percdamp)
    W = weight.detach().to(torch.float32).clone()
    mask = mask.to(device=W.device, dtype=torch.bool)
    with _one_thread_on_cpu(W):
        _, loss = _obs_columns(W, U, blocksize=blocksize, mask=mask)
    weight.copy_(W.to(weight.dtype))
    weight.masked_fill_(mask, 0)
    return {"damp": damp, "dead_inputs": int(dead.sum()), "obs_loss": loss}
