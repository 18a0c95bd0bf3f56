"""Block refit: the kept weights of one decoder block trained jointly to reproduce the dense block.

The per-matrix rules (`obs`, `lsq`) make each matrix reproduce its own dense outputs on its own inputs;
nothing corrects what the errors of q, k, v, o, gate, up and down do together through attention, the
gate's nonlinearity and the residual stream. Here, once a block's masks are fixed, its target weights are
trained together on the block's recorded inputs X against the dense block's outputs Y on those same
inputs (computed before the block was pruned):

    min over kept W   sum_b L(block_W(X_b), Y_b),   W[mask] = 0 throughout

Each step is one full pass over every recorded micro-batch. By default (`batch` 0) the pass ends in one
Adam step on the gradients of all of them (summed, token-weighted); `batch` k takes an Adam step after
every k micro-batches instead (the pass in order, each step on its own micro-batches' mean loss), so a
pass buys ceil(n / k) updates for the same forward and backward work. With several processes every rank
runs the refit over every micro-batch in one process's order (the layer-wise executor gives each rank
all of them): adding per-rank gradient sums would round differently, and the replicas must take one
process's steps bit for bit. The pruned weights get no gradient and are reset to exactly 0 after every
step. Losses: `mse` (mean over every output element) or `normalized` (per token, the squared error over
the dense output's squared norm, averaged over tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Call = tuple[tuple, dict]


def block_loss(out: torch.Tensor, dense: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum over the batch's tokens of the per-token loss (divide by the token count for the mean)."""
    err = (out.float() - dense.float()).square().sum(dim=-1)
    if kind == "normalized":
        err = err / dense.float().square().sum(dim=-1).clamp_min(1e-12)
    else:
        err = err / out.shape[-1]
    return err.sum()


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _run(block: nn.Module, call: Call, move: Callable) -> torch.Tensor:
    args, kwargs = move(call)
    return _hidden(block(*args, **kwargs))


def refit_block_(
    block: nn.Module,
    params: list[nn.Parameter],
    calls: list[Call],
    dense: list[torch.Tensor],
    *,
    steps: int,
    lr: float,
    loss: str = "mse",
    batch: int = 0,
    move: Callable[[Call], Call] = lambda c: c,
) -> dict[str, float | int]:
    """Train `params` (the block's target weights; zeros are the masks) in place for `steps` full passes
    over `calls` against `dense` outputs, an Adam step every `batch` calls (0: one per pass). `move(call)`
    puts a call on the block's device. Returns the loss per token before and after, and the number of Adam
    updates."""
    masks = [p.detach() == 0 for p in params]
    flags = [p.requires_grad for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    size = batch if 0 < batch < len(calls) else len(calls)
    chunks = [range(i, min(i + size, len(calls))) for i in range(0, len(calls), size)]
    # one step per pass: its loss is the loss before; several: a pass without gradients measures it
    device = params[0].device
    before = _loss(block, calls, dense, loss, move, device) if len(chunks) > 1 or not steps else None
    updates = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(steps):
            for chunk in chunks:
                seen = _step_(block, params, masks, opt, [calls[j] for j in chunk], [dense[j] for j in chunk],
                              loss, move)  # fmt: skip
                before = seen if before is None else before
                updates += 1
        after = _loss(block, calls, dense, loss, move, device)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
            p.grad = None
    return {"loss_before": before, "loss_after": after, "updates": updates}


@torch.no_grad()
def _loss(block: nn.Module, calls: list[Call], dense: list[torch.Tensor], loss: str, move: Callable,
          device: torch.device) -> float:  # fmt: skip
    """The mean loss per token over every call, without gradients."""
    tokens = float(sum(d.shape[:-1].numel() for d in dense))
    return sum(float(block_loss(_run(block, c, move), y.to(device), loss))
               for c, y in zip(calls, dense, strict=True)) / tokens  # fmt: skip


def _step_(block: nn.Module, params: list[nn.Parameter], masks: list[torch.Tensor], opt: torch.optim.Adam,
           calls: list[Call], dense: list[torch.Tensor], loss: str, move: Callable) -> float:  # fmt: skip
    """One Adam step on these calls' mean loss per token (returned, before the step); the pruned weights
    get no gradient and are reset to exactly 0."""
    tokens = float(sum(d.shape[:-1].numel() for d in dense))
    seen = 0.0
    with torch.enable_grad():
        for call, y in zip(calls, dense, strict=True):
            value = block_loss(_run(block, call, move), y.to(params[0].device), loss) / tokens
            value.backward()
            seen += float(value.detach())
    for p, m in zip(params, masks, strict=True):
        p.grad = (p.grad if p.grad is not None else torch.zeros_like(p)).masked_fill_(m, 0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, m in zip(params, masks, strict=True):
            p.masked_fill_(m, 0)
    return seen
