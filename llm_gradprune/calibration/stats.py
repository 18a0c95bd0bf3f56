"""Calibration statistics: fp32 accumulators fed by hooks.

A gradient is one micro-batch's gradient g_b of the mean loss over that micro-batch. For each
target weight we keep only the sums the chosen criterion reads:

    grad_sum     = sum_b g_b          (taylor)
    grad_abs_sum = sum_b |g_b|        (gradient)
    grad_sq_sum  = sum_b g_b^2        (fisher, gblm)

plus, per tensor, the number of gradients folded in. Each gradient is folded in by a
post-accumulate-grad hook the moment autograd finishes it and is released right there, so a full set
of gradients never exists. Squares are taken after the cast to fp32: no half-precision underflow.

With `grad_accum` > 1 one gradient is the mean gradient of that many
consecutive micro-batches: they are summed in an fp32 buffer per target (on the statistics' device) and
folded in by `end_accumulation()`; this buffer is the one extra model-sized cost of the knob.

Statistics may live on another device than the weights (`device="cpu"` while the model is on a GPU):
each gradient is then copied into one of two reused pinned host buffers with a non-blocking copy, and
the fold on the CPU is deferred to the next hook, so it overlaps the GPU's next backward kernels; the
finiteness check runs on the host copy, never forcing a GPU sync. The GPU then holds only the model,
activations and the one gradient being produced.

Activation statistics (`act_sq_sum`: per input channel, sum over tokens of x^2) come from forward
hooks on the same pass and are allocated only for criteria that read them.

Every accumulator answers the same protocol, so the loop, the cross-process reduction and the saved
calibration state treat them alike: `attach()`/`detach()`, `tensors()` (its sums by a stable key),
`counters()`/`load_counters()` (its per-tensor counts), `holds(sum)` and `mean(sum, weight name)`, and
`paused` for forward hooks. Each is configured once, by its constructor. `STATISTICS` is the registry
criteria name their inputs from; `Statistics` holds the accumulators of one pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import Collective
from ..registry import Registry
from .hessians import Hessians
from .hooks import ForwardHooked, reads_rows

GRAD_STATS = ("grad_sum", "grad_abs_sum", "grad_sq_sum")


def all_finite(g: torch.Tensor) -> bool:
    """All entries finite? A NaN or inf entry always makes the fp32 sum non-finite, and a sum is ~20x
    cheaper than `isfinite(g).all()` on a CPU; only a non-finite sum (overflow) needs the exact test."""
    if bool(torch.isfinite(g.sum())):
        return True
    return bool(torch.isfinite(g).all())


class GradStats:
    """Per-weight fp32 gradient sums for the named parameters.

    `grad_accum`: micro-batches per gradient (gradient accumulation). `collective`: with row shards
    (FSDP2) the sums hold this rank's rows, gradients are collected after backward (`collect_`) instead
    of by hooks, a non-finite one is skipped by every rank together, and the sums are never added
    across ranks (`row_sharded`).
    """

    def __init__(
        self,
        params: dict[str, Any],
        needs: set[str] | tuple[str, ...],
        device=None,
        *,
        grad_accum: int = 1,
        collective: Collective | None = None,
    ):
        unknown = set(needs) - set(GRAD_STATS)
        if unknown:
            raise ValueError(f"unknown gradient statistics {sorted(unknown)}: allowed {GRAD_STATS}")
        if grad_accum < 1:
            raise ValueError(f"an accumulation holds at least one micro-batch, not {grad_accum}")
        # `params`: {weight name: parameter}, or {weight name: Target} where a target is a view of a
        # parameter (a Conv1D's transpose, one expert of a fused parameter): the parameter's gradient is
        # then split into its targets' views, and one hook serves all targets of one parameter
        self.views = {n: p.matrix for n, p in params.items() if not isinstance(p, torch.Tensor)}
        self.params = {n: (p if isinstance(p, torch.Tensor) else p.param) for n, p in params.items()}
        self.grad_accum = grad_accum  # micro-batches per gradient; > 1: summed, folded by end_accumulation()
        self.row_sharded = collective is not None and collective.rows_sharded
        # this rank's rows of a tensor (row shards); the sums take their shape
        self.local: Callable[[torch.Tensor, str], torch.Tensor] | None = (
            collective.local if self.row_sharded else None
        )
        # agree(flags) -> flags: every rank's verdict on "this gradient is finite" (row shards must skip
        # a micro-batch together); None where each rank folds its own micro-batches
        self.agree: Callable[[list[bool]], list[bool]] | None = collective.agree if self.row_sharded else None
        self.needs = tuple(s for s in GRAD_STATS if s in needs)
        shapes = {
            n: (self.local(p, n) if self.local is not None else self._view(n, p))
            for n, p in self.params.items()
        }
        self.sums: dict[str, dict[str, torch.Tensor]] = {
            stat: {
                n: torch.zeros(t.shape, dtype=torch.float32, device=device or t.device)
                for n, t in shapes.items()
            }
            for stat in self.needs
        }
        self._largest = max((t.numel() for t in shapes.values()), default=0)  # local elements
        self._largest_bytes = max((t.numel() * t.element_size() for t in shapes.values()), default=0)
        self.counts = {n: 0 for n in params}
        self.skipped = {n: 0 for n in params}
        self._handles: list = []
        self._accum_sums: dict[str, torch.Tensor] = {}  # kept across accumulations: no re-allocation
        self._accumulating: set[str] = set()  # targets whose accumulated sum holds gradients not yet folded
        self._scratch: dict[torch.device, torch.Tensor] = {}  # fp32 conversion buffer per device
        self._staging: list[torch.Tensor] = []  # two pinned host buffers (GPU grads, host statistics)
        self._pending: tuple | None = None  # (name, host view, event) of a copy not yet folded
        self._flip = 0
        self.stage_on_host = False  # tests: force the staged path without a GPU

    @property
    def accumulating(self) -> bool:
        """Does an accumulation hold gradients not yet folded into the sums? (A saved state
        would miss them: it waits for the accumulation's end.)"""
        return bool(self._accumulating)

    def _view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        view = self.views.get(name)
        return t if view is None else view(t)

    def _by_param(self) -> dict[int, tuple[torch.Tensor, list[str]]]:
        by: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for name, p in self.params.items():
            by.setdefault(id(p), (p, []))[1].append(name)
        return by

    def attach(self) -> GradStats:
        """Fold each gradient as autograd finishes it, or with row shards leave them for `collect_`."""
        for p, names in self._by_param().values():
            p.requires_grad_(True)
            if not self.row_sharded:
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(names)))
        return self

    def collect_(self) -> None:
        """After a backward without hooks (row shards): consume this rank's rows of every gradient."""
        names = [n for n, p in self.params.items() if p.grad is not None]
        local = self.local if self.local is not None else (lambda t, n: t)
        items = [(n, local(self.params[n].grad, n)) for n in names]
        if self.grad_accum == 1:
            self.fold_many_(items)
        else:
            for n, g in items:
                self._consume(n, g)
        for n in names:
            self.params[n].grad = None

    def detach(self) -> None:
        self.flush()
        self._accum_sums.clear()
        self._accumulating.clear()
        self._scratch.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self.params.values():
            p.grad = None
            p.requires_grad_(False)

    def _make_hook(self, names: list[str]):
        def hook(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None  # release the gradient at once
            for name in names:
                self.receive(name, self._view(name, g))

        return hook

    def _device(self, name: str) -> torch.device:
        return self.sums[self.needs[0]][name].device if self.needs else self.params[name].device

    def receive(self, name: str, g: torch.Tensor) -> None:
        """One micro-batch gradient from a hook: moved to the statistics' device, then consumed."""
        dev = self._device(name)
        if (g.device.type == "cuda" and dev.type == "cpu") or self.stage_on_host:
            self._stage(name, g)
        else:
            self._consume(name, g)

    def _stage(self, name: str, g: torch.Tensor) -> None:
        """Non-blocking copy into a pinned host buffer; the previous staged gradient is folded meanwhile."""
        need = g.numel() * g.element_size()
        if not self._staging or self._staging[0].numel() < need:
            self.flush()
            size = max(need, self._largest_bytes)
            pin = g.device.type == "cuda"
            self._staging = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        host = self._staging[self._flip][:need].view(g.dtype).view(g.shape)
        self._flip ^= 1
        host.copy_(g, non_blocking=True)
        event = None
        if g.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(g.device))
        previous, self._pending = self._pending, (name, host, event)
        if previous is not None:
            self._finish(previous)

    def _finish(self, pending: tuple) -> None:
        name, host, event = pending
        if event is not None:
            event.synchronize()
        self._consume(name, host)

    def flush(self) -> None:
        """Fold the gradient still in flight to the host, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._finish(pending)

    def _consume(self, name: str, g: torch.Tensor) -> None:
        if self.grad_accum == 1:
            self.fold(name, g)
            return
        acc = self._accum_sums.get(name)
        if acc is None:
            acc = self._accum_sums[name] = torch.empty(
                g.shape, dtype=torch.float32, device=self._device(name)
            )
        if name in self._accumulating:
            acc.add_(g.to(acc.device))
        else:
            acc.copy_(g)
            self._accumulating.add(name)

    def end_accumulation(self, size: int) -> None:
        """Fold each target's summed gradient of the `size` micro-batches just run, as one sample (their mean)."""
        self.flush()
        names = [n for n in self.params if n in self._accumulating]  # the same order on every rank
        self.fold_many_([(n, self._accum_sums[n].div_(size)) for n in names])
        self._accumulating.clear()

    def fold(self, name: str, g: torch.Tensor) -> None:
        """Add one micro-batch gradient of parameter `name` into the sums (or skip it if not finite)."""
        self.fold_many_([(name, g)])

    def fold_many_(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Fold several gradients; a non-finite one is skipped (on every rank, when `agree` is set)."""
        flags = [all_finite(g) for _, g in items]
        if self.agree is not None:
            flags = self.agree(flags)
        for (name, g), finite in zip(items, flags, strict=True):
            if finite:
                self._add(name, g)
            else:
                self.skipped[name] += 1
                if self.skipped[name] == 1:
                    warnings.warn(
                        f"non-finite gradient for {name}: batch skipped for this tensor", stacklevel=3
                    )

    def _add(self, name: str, g: torch.Tensor) -> None:
        dev = self._device(name)
        if g.dtype != torch.float32 or g.device != dev:
            # a reused buffer: a fresh 4-byte-per-weight tensor per fold costs more in page faults
            # than the conversion itself (44 ms vs 3 ms for an 11.5M bf16 gradient on a CPU)
            scratch = self._scratch.get(dev)
            if scratch is None or scratch.numel() < g.numel():
                size = max(g.numel(), self._largest)
                scratch = self._scratch[dev] = torch.empty(size, dtype=torch.float32, device=dev)
            g = scratch[: g.numel()].view(g.shape).copy_(g)
        # Order matters: abs_ last because it overwrites g, which we own now.
        if "grad_sum" in self.sums:
            self.sums["grad_sum"][name].add_(g)
        if "grad_sq_sum" in self.sums:
            self.sums["grad_sq_sum"][name].addcmul_(g, g)
        if "grad_abs_sum" in self.sums:
            self.sums["grad_abs_sum"][name].add_(g.abs_())
        self.counts[name] += 1

    def holds(self, stat: str) -> bool:
        return stat in self.sums

    def mean(self, stat: str, name: str) -> torch.Tensor:
        """The sum `stat` of weight `name` over its gradients."""
        n = self.counts[name]
        if n == 0:
            raise RuntimeError(f"no finite gradient was folded in for {name}: cannot average {stat}")
        return self.sums[stat][name] / n

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"grad.{stat}.{n}": t for stat, per in self.sums.items() for n, t in per.items()}

    def counters(self) -> dict[str, dict[str, int]]:
        return {"grad_counts": dict(self.counts), "grad_skipped": dict(self.skipped)}

    def load_counters(self, values: dict[str, dict[str, int]]) -> None:
        self.counts = {n: int(v) for n, v in values["grad_counts"].items()}
        self.skipped = {n: int(v) for n, v in values["grad_skipped"].items()}


class TokenSums(ForwardHooked):
    """Per-module fp32 sums over tokens fed by forward hooks: `mean` divides by the tokens counted.
    A subclass names its statistic (`STAT`), its keys in a saved state (`KEY`) and what it records."""

    STAT = KEY = RECORDS = ""
    sums: dict[str, torch.Tensor]
    tokens: dict[str, int]

    def holds(self, stat: str) -> bool:
        return stat == self.STAT

    def mean(self, stat: str, name: str) -> torch.Tensor:
        """The mean over tokens of the module's sums (`name`: the module, or its weight)."""
        name = name.removesuffix(".weight")
        if self.tokens.get(name, 0) == 0:
            raise RuntimeError(f"no {self.RECORDS} were recorded for {name}")
        return self.sums[name] / self.tokens[name]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.KEY}.{n}": t for n, t in self.sums.items()}

    def counters(self) -> dict[str, dict[str, int]]:
        return {f"{self.KEY}_tokens": dict(self.tokens)}

    def load_counters(self, values: dict[str, dict[str, int]]) -> None:
        self.tokens = {n: int(v) for n, v in values[f"{self.KEY}_tokens"].items()}


class ActStats(TokenSums):
    """Per-input-channel fp32 sums of squared layer inputs over all tokens, via forward hooks."""

    STAT, KEY, RECORDS = "act_sq_sum", "act", "activations"

    def __init__(self, modules: dict[str, nn.Module], device=None):
        self.modules = {n: m for n, m in modules.items() if reads_rows(m)}
        self.sums = {
            n: torch.zeros(m.weight.shape[1], dtype=torch.float32, device=device or m.weight.device)
            for n, m in self.modules.items()
        }
        self.tokens = {n: 0 for n in self.sums}
        self._handles: list = []
        self.paused = False  # set during backward: checkpoint recomputes re-run forward hooks

    def _make_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            if self.paused:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            acc = self.sums[name]
            acc.add_(x.to(device=acc.device, dtype=torch.float32).pow(2).sum(dim=0))
            self.tokens[name] += x.shape[0]

        return hook

    def mean_sq(self, name: str) -> torch.Tensor:
        """mean over tokens of x_j^2, per input channel j."""
        return self.mean(self.STAT, name)


class TokenGradStats(TokenSums):
    """Per-weight fp32 sums over tokens of the per-token gradient squared, (dL/dy_t,i * x_t,j)^2.

    The weight gradient of a Linear layer is a sum over tokens, g = sum_t d_t x_t^T; GradStats sees only
    that sum per micro-batch, where contributions of different tokens cancel. Summing the squares of
    the per-token terms instead gives the diagonal of the per-token empirical Fisher (Gauss-Newton)
    matrix, the curvature Optimal Brain Damage asks for. It costs one extra [out, T] x [T, in] matmul
    per layer and batch (as much as the weight gradient itself) and one fp32 tensor per weight.
    Filled by a forward hook that hooks the layer's output gradient, so it needs a backward pass; when
    no weight before a layer needs a gradient, its output is made to require one, so the backward
    reaches every hooked layer without any weight gradient being computed.

    The squares go into two reused fp32 buffers (a fresh tensor per hook costs more in page faults
    than the arithmetic), and x^2 is computed once for layers that read the very same input tensor
    (q/k/v, gate/up): the sums are exactly those of `addmm_(d.square().T, x.square())` per layer.
    """

    STAT, KEY, RECORDS = "token_grad_sq_sum", "tok", "output gradients"

    def __init__(self, modules: dict[str, nn.Module], device=None):
        self.modules = {n: m for n, m in modules.items() if reads_rows(m)}
        self.sums = {
            n: torch.zeros(m.weight.shape, dtype=torch.float32, device=device or m.weight.device)
            for n, m in self.modules.items()
        }
        self.tokens = {n: 0 for n in self.sums}
        self._handles: list = []
        self.paused = False
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}
        # (input tensor, its x^2 view): held only until the next forward hook, so the object cannot be
        # freed and its address reused by another input while the entry is looked up
        self._x_sq: tuple[torch.Tensor, torch.Tensor] | None = None

    def _forget(self) -> None:
        self._buffers.clear()
        self._x_sq = None

    def _square(self, t: torch.Tensor, slot: str, device: torch.device) -> torch.Tensor:
        """t^2 in fp32 on `device`, into the reused buffer `slot` (the cast comes before the square)."""
        t = t.reshape(-1, t.shape[-1])
        buf = self._buffers.get((slot, device))
        if buf is None or buf.numel() < t.numel():
            buf = self._buffers[(slot, device)] = torch.empty(t.numel(), dtype=torch.float32, device=device)
        out = buf[: t.numel()].view(t.shape)
        if t.dtype == torch.float32 and t.device == device:
            return torch.mul(t, t, out=out)
        return out.copy_(t).square_()

    def _fold(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        acc = self.sums[name]
        cached = self._x_sq
        if cached is not None and cached[0] is x and cached[1].device == acc.device:
            xx = cached[1]
        else:
            xx = self._square(x, "x", acc.device)
            self._x_sq = (x, xx)
        acc.addmm_(self._square(grad, "d", acc.device).T, xx)
        self.tokens[name] += xx.shape[0]

    def _make_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            self._x_sq = None  # a new forward: the previous backward's inputs are done with
            if self.paused:
                return
            if not output.requires_grad:
                if not torch.is_grad_enabled() or output.grad_fn is not None:
                    return  # a no-grad pass (e.g. a checkpointed layer's first forward): counted on recompute
                output.requires_grad_(True)  # no weight before it needs a gradient: start the backward here
            x = inputs[0].detach()
            output.register_hook(lambda grad: self._fold(name, x, grad))

        return hook


class RoutedTokens(TokenSums):
    """Tokens each expert matrix received (the router's choice), counted for the report and for the
    rule on experts that received none: with no routed token an expert has no activation, Hessian or
    gradient evidence (its gradient is exactly 0), so every statistic of it reads as neutral (ones, an
    identity Hessian): every criterion then ranks its weights by magnitude and no update moves them."""

    STAT, KEY, RECORDS = "", "routed", "routed tokens"

    def __init__(self, modules: dict[str, Any]):
        self.modules = {n: m for n, m in modules.items() if getattr(m, "expert", None) is not None}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = {n: 0 for n in self.modules}
        self._handles: list = []
        self.paused = False

    def holds(self, stat: str) -> bool:
        return False

    def _make_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            if not self.paused:
                self.tokens[name] += inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]

        return hook

    def unrouted(self, pname: str) -> bool:
        return self.tokens.get(pname, 1) == 0

    def neutral(self, stat: str, pname: str) -> torch.Tensor:
        w = self.modules[pname].weight
        rows, cols = w.shape
        if stat == "act_sq_mean":
            return torch.ones(cols, dtype=torch.float32, device=w.device)
        if stat == "hessian":
            return torch.eye(cols, dtype=torch.float32, device=w.device)
        return torch.ones(rows, cols, dtype=torch.float32, device=w.device)


# -- the registry of statistics criteria read, and the container of one pass -----------------------
@dataclass(frozen=True)
class Statistic:
    """A mean statistic a criterion can read (its argument name), and how it is gathered."""

    name: str
    accumulator: str  # the fp32 sum kept (for GradStats: which of its sums)
    source: str  # "grad", "act", "token" or "hessian": the accumulator class below
    backward: bool  # needs a backward pass
    per_block: bool  # can be gathered decoder block by decoder block (layer-wise mode: on pruned outputs)
    help: str


STATISTICS: Registry[Statistic] = Registry("statistic")
for _s in (
    Statistic("grad_mean", "grad_sum", "grad", True, False, "E_b[g] per weight"),
    Statistic("grad_abs_mean", "grad_abs_sum", "grad", True, False, "E_b[|g|] per weight"),
    Statistic("grad_sq_mean", "grad_sq_sum", "grad", True, False, "E_b[g^2] per weight"),
    Statistic("act_sq_mean", "act_sq_sum", "act", False, True, "E_t[x_j^2] per input channel"),
    Statistic(
        "token_grad_sq_mean", "token_grad_sq_sum", "token", True, False, "E_t[(dL/dy_t,i x_t,j)^2] per weight"
    ),  # fmt: skip
    Statistic("hessian", "hessian", "hessian", False, True, "H = 2 X X^T / n per layer input"),
    Statistic(
        "block_grad_abs_mean",
        "grad_abs_sum",
        "blockgrad",
        False,
        True,
        "E_b[|d ||block output||_2 / dw|] per weight: the regional gradient of its decoder block, taken "
        "on the block's own inputs (layer-wise; Wanda++)",
    ),
    Statistic(
        "block_token_sq_mean",
        "token_grad_sq_sum",
        "blocktoken",
        False,
        True,
        "E_t[(d<r, block output>/dy_t,i x_t,j)^2] per weight, r a fixed Rademacher probe: the per-token "
        "Gauss-Newton curvature of its decoder block's output, on the block's own inputs (layer-wise)",
    ),
):
    STATISTICS.add(_s.name, _s)


# the sources filled by a backward through one decoder block (layer-wise only), and the block objective
# whose gradients each folds (executors.blocks.run_block_backward)
BLOCK_OBJECTIVES = {"blockgrad": "norm", "blocktoken": "probe"}


class Statistics:
    """The accumulators of one calibration pass, by source; `mean(statistic, weight name)` reads them."""

    def __init__(self, accumulators: dict[str, Any] | None = None, needs: set[str] | None = None):
        self.by_source: dict[str, Any] = dict(accumulators or {})
        self.needs: set[str] = set(needs or ())  # the mean statistics it was made for
        self.counters: dict[str, Any] = {}  # the filling pass's batches, tokens, loss, seconds

    @property
    def grad(self) -> GradStats | None:
        return self.by_source.get("grad")

    @property
    def needs_backward(self) -> bool:
        return "grad" in self.by_source or "token" in self.by_source

    def accumulators(self) -> list[Any]:
        return list(self.by_source.values())

    def forward_hooked(self) -> list[Any]:
        """The accumulators fed by forward hooks (all but the weight gradients)."""
        return [acc for source, acc in self.by_source.items() if source != "grad"]

    def counting_inputs(self) -> list[Any]:
        """The accumulators that count layer inputs: a checkpointed layer's recompute in backward must
        not feed them twice (the per-token statistic counts only outputs that require grad)."""
        return [acc for source, acc in self.by_source.items() if source in ("act", "hessian", "routed")]

    def has(self, stat: str) -> bool:
        s = STATISTICS.get(stat)
        acc = self.by_source.get(s.source)
        return acc is not None and acc.holds(s.accumulator)

    def mean(self, stat: str, pname: str) -> torch.Tensor:
        """The mean statistic `stat` of weight `pname` (neutral for an expert no token was routed to)."""
        s = STATISTICS.get(stat)
        routed = self.by_source.get("routed")
        if routed is not None and routed.unrouted(pname):
            return routed.neutral(stat, pname)
        return self.by_source[s.source].mean(s.accumulator, pname)

    def unrouted(self) -> list[str]:
        """The expert matrices no calibration token was routed to (in this pass)."""
        routed = self.by_source.get("routed")
        return [n for n, c in routed.tokens.items() if c == 0] if routed is not None else []


def make_statistics(
    stats: set[str],
    modules: dict[str, nn.Module],
    device=None,
    *,
    grad_accum: int = 1,
    collective: Collective | None = None,
) -> Statistics:
    """Allocate exactly the accumulators `stats` (mean statistic names) read, for these modules' weights.

    `device` places the fp32 gradient statistics (None: beside each weight); `grad_accum` is the gradient
    accumulation; `collective` (row shards) makes the gradient sums hold this rank's rows.
    """
    params = {_key(n, m): (m if hasattr(m, "matrix") else m.weight) for n, m in modules.items()}
    by_source: dict[str, set[str]] = {}
    for name in stats:
        s = STATISTICS.get(name)
        by_source.setdefault(s.source, set()).add(s.accumulator)
    build = {  # in this order, so hooks attach in it
        "grad": lambda sums: GradStats(
            params, sums, device=device, grad_accum=grad_accum, collective=collective
        ),
        "token": lambda sums: _token_stats(modules, device),
        "act": lambda sums: ActStats(modules),
        "hessian": lambda sums: Hessians(modules),
        "blockgrad": lambda sums: GradStats(params, sums, device=device),
        "blocktoken": lambda sums: _token_stats(modules, device),
    }
    made = {source: make(by_source[source]) for source, make in build.items() if source in by_source}
    if any(getattr(m, "expert", None) is not None for m in modules.values()):
        made["routed"] = RoutedTokens(modules)
    return Statistics(made, needs=stats)


def _key(name: str, module: Any) -> str:
    """A target's weight name (its `key`), or a plain module's `<name>.weight`."""
    return getattr(module, "key", None) or f"{name}.weight"


def _token_stats(modules: dict[str, nn.Module], device) -> TokenGradStats:
    # A per-token statistic alone needs no weight gradient: its hooks start the backward at the hooked
    # outputs (TokenGradStats._make_hook), so the weight-gradient matmuls and their finiteness checks
    # are not paid (measured 1.26x -> 1.07x the plain loop's time, docs/BENCHMARKS.md).
    tok = TokenGradStats(modules, device=device)
    if len(tok.modules) < len(modules):
        other = next(n for n in modules if n not in tok.modules)
        raise ConfigError(
            f"the per-token gradient statistic reads Linear, Conv1D and expert matrices only; {other!r} is none"
        )
    return tok
