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


class DynamicMasks:
    """Masks that move during the refit (`block_mask: dynamic`). Every target weight, pruned or kept, has
    a shadow value trained straight through: the block runs on shadow x keep, and each shadow entry takes
    its effective weight's gradient. Between passes each row of each target matrix keeps as many weights
    as before (each N:M group its N), those of the largest |shadow| rms(x_j), x the matrix's inputs seen
    in the pass. Pruned shadows start from the dense weights. `params` as the refit trains them, `dense`
    their values before pruning, `targets` the matrices in them (views into fused ones)."""

    def __init__(self, params: list[nn.Parameter], dense: list[torch.Tensor], targets: list,
                 nm: tuple[int, int] | None):  # fmt: skip
        self.params, self.targets, self.nm = params, targets, nm
        self.keep = [p.detach() != 0 for p in params]
        self.shadow = [torch.where(k, p.detach(), d.to(p.dtype)).requires_grad_(True)
                       for p, k, d in zip(params, self.keep, dense, strict=True)]  # fmt: skip
        index = {id(p): i for i, p in enumerate(params)}
        self.of = [index[id(t.param)] for t in targets]  # each target's parameter
        self.act = [
            torch.zeros(t.weight.shape[1], dtype=torch.float32, device=t.weight.device) for t in targets
        ]
        self.tokens = [0] * len(targets)
        self.changed = 0
        self._handles: list = []

    def attach(self) -> None:
        for i, t in enumerate(self.targets):
            self._handles.append(t.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(target, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            self.act[i] += x.square().sum(0)
            self.tokens[i] += x.shape[0]

        return hook

    def move_grads_(self) -> None:
        """Each effective weight's gradient becomes its shadow's (straight through)."""
        for p, s in zip(self.params, self.shadow, strict=True):
            s.grad, p.grad = p.grad, None

    @torch.no_grad()
    def apply_(self) -> None:
        for p, s, k in zip(self.params, self.shadow, self.keep, strict=True):
            p.copy_(s * k)

    @torch.no_grad()
    def rechoose_(self) -> None:
        """Each row keeps as many weights as before (each N:M group N), those of the largest score; a
        matrix that saw no input in the pass (an expert no token was routed to) keeps its mask."""
        for i, t in enumerate(self.targets):
            if not self.tokens[i]:
                continue
            s, k = t.matrix(self.shadow[self.of[i]]), t.matrix(self.keep[self.of[i]])
            score = s.abs().float() * (self.act[i] / self.tokens[i]).sqrt()
            new = _top_per_row(score, k.sum(1)) if self.nm is None else _top_per_group(score, *self.nm)
            self.changed += int((new != k).sum()) // 2
            k.copy_(new)
            self.act[i].zero_()
            self.tokens[i] = 0
        self.apply_()


def _top_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """True at each row's `counts[row]` largest scores (ties: the lower column)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(score.shape[1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks) < counts[:, None]


def _top_per_group(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the n largest scores of every group of m consecutive columns."""
    groups = score.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(score.shape)


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
    dynamic: DynamicMasks | None = None,
) -> dict[str, float | int]:
    """Train `params` (the block's target weights; zeros are the masks) in place for `steps` full passes
    over `calls` against `dense` outputs, an Adam step every `batch` calls (0: one per pass). `move(call)`
    puts a call on the block's device. With `dynamic` the masks are chosen again between passes. Returns
    the loss per token before and after, and the number of Adam updates."""
    masks = [p.detach() == 0 for p in params]
    flags = [p.requires_grad for p in params]
    opt = torch.optim.Adam(params if dynamic is None else dynamic.shadow, lr=lr)
    size = batch if 0 < batch < len(calls) else len(calls)
    chunks = [range(i, min(i + size, len(calls))) for i in range(0, len(calls), size)]
    # one step per pass: its loss is the loss before; several: a pass without gradients measures it
    device = params[0].device
    before = _loss(block, calls, dense, loss, move, device) if len(chunks) > 1 or not steps else None
    updates = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for step in range(steps):
            if dynamic is not None and step < steps - 1:
                dynamic.attach()
            for chunk in chunks:
                seen = _step_(block, params, masks, opt, [calls[j] for j in chunk], [dense[j] for j in chunk],
                              loss, move, dynamic)  # fmt: skip
                before = seen if before is None else before
                updates += 1
            if dynamic is not None and step < steps - 1:
                dynamic.detach()
                dynamic.rechoose_()
        after = _loss(block, calls, dense, loss, move, device)
    finally:
        if dynamic is not None:
            dynamic.detach()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
            p.grad = None
    out = {"loss_before": before, "loss_after": after, "updates": updates}
    if dynamic is not None:
        out["mask_changes"] = dynamic.changed
    return out


@torch.no_grad()
def _loss(block: nn.Module, calls: list[Call], dense: list[torch.Tensor], loss: str, move: Callable,
          device: torch.device) -> float:  # fmt: skip
    """The mean loss per token over every call, without gradients."""
    tokens = float(sum(d.shape[:-1].numel() for d in dense))
    return sum(float(block_loss(_run(block, c, move), y.to(device), loss))
               for c, y in zip(calls, dense, strict=True)) / tokens  # fmt: skip


def _step_(block: nn.Module, params: list[nn.Parameter], masks: list[torch.Tensor], opt: torch.optim.Adam,
           calls: list[Call], dense: list[torch.Tensor], loss: str, move: Callable,
           dynamic: DynamicMasks | None = None) -> float:  # fmt: skip
    """One Adam step on these calls' mean loss per token (returned, before the step); the pruned weights
    get no gradient and are reset to exactly 0."""
    tokens = float(sum(d.shape[:-1].numel() for d in dense))
    seen = 0.0
    with torch.enable_grad():
        for call, y in zip(calls, dense, strict=True):
            value = block_loss(_run(block, call, move), y.to(params[0].device), loss) / tokens
            value.backward()
            seen += float(value.detach())
    if dynamic is not None:
        dynamic.move_grads_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dynamic.apply_()
        return seen
    for p, m in zip(params, masks, strict=True):
        p.grad = (p.grad if p.grad is not None else torch.zeros_like(p)).masked_fill_(m, 0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, m in zip(params, masks, strict=True):
            p.masked_fill_(m, 0)
    return seen
