"""Weight reconstruction: layer-wise Hessians and Optimal Brain Surgeon updates (SparseGPT).

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
from torch import nn

from .select import num_to_prune


class Hessians:
    """Per-module fp32 sums of x x^T over input tokens, fed by forward hooks.

    Modules that read the very same input tensor (q/k/v, gate/up) share one accumulator: the hook sees
    the identical tensor object and records the alias instead of doing the product again.
    """

    def __init__(self, modules: dict[str, nn.Module], device=None):
        self.modules = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles: list = []

    def attach(self) -> Hessians:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _make_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0]
            if name in self.alias:
                return
            if self._last is not None and self._last[0] is x and self._last[1] != name:
                if name not in self.sums:  # first sight: same input as the previous module
                    self.alias[name] = self._last[1]
                    return
            self._last = (x, name)
            self.add(name, x)

        return hook

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if name not in self.sums:
            dev = self.device or x.device
            self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=dev)
            self.tokens[name] = 0
        acc = self.sums[name]
        x = x.to(device=acc.device, dtype=torch.float32)
        acc.addmm_(x.T, x)
        self.tokens[name] += x.shape[0]

    def owner(self, name: str) -> str:
        return self.alias.get(name, name)

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2 X X^T / n over all tokens seen by module `name` (a new tensor)."""
        key = self.owner(name)
        if self.tokens.get(key, 0) == 0:
            raise RuntimeError(f"no inputs were recorded for {name}: cannot build its Hessian")
        return self.sums[key] * (2.0 / self.tokens[key])

    def nbytes(self, name: str) -> int:
        return self.sums[self.owner(name)].numel() * 4

    def free(self) -> None:
        self.sums.clear()
        self.tokens.clear()
        self.alias.clear()


def hessian_bytes(in_features: int) -> int:
    """fp32 bytes of one layer Hessian: in_features^2 x 4."""
    return in_features * in_features * 4


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
    H, dead, damp = damped_hessian(H, percdamp, add=False)
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(6):
        Hd = H.clone()
        Hd[idx, idx] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, dead, damp
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
