"""Choosing what to remove: one shape for every layer, the units within each layer by their scores.

Widths are uniform (the saved config is a plain one, which holds one width per kind of MLP, one head
count and one expert count), so the choice is (layers removed, KV heads kept, query heads kept per
group, channels kept per MLP of each width group, experts kept per MoE layer). Width groups (dense MLP,
routed experts, shared expert) keep the same share of their channels. For a parameter target, every
combination the config class accepts is tried and the channels (or experts) fill what remains: a single-kind structure takes the shape nearest the target from below; `mixed`
takes the one whose removed units add up to the least estimated loss increase (the global ranking
under the uniform constraint). Within a layer the lowest-scored units go; ties keep the earlier unit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .importance import LayerScores
from .units import Shape, UnitCosts

log = logging.getLogger("llm_gradprune")


@dataclass
class Choice:
    removed_layers: list[int]
    widths: dict[str, int]  # MLP group (config key) -> channels kept per MLP
    kv_heads: int
    group: int  # query heads kept per KV group
    experts: int = 0  # routed experts kept per MoE layer
    channels: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> kept channels per MLP
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept query heads, group-major
    groups: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept KV heads, ascending
    kept_experts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept experts, ascending
    params_after: int = 0
    cost: float = 0.0
    candidates: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what rounding a keep ratio did, for the report

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending; ties keep the earlier index."""
    order = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def removal_curve(scores: torch.Tensor) -> torch.Tensor:
    """curve[m] = sum of the m lowest scores: the cost of removing m units (ties: the later ones first)."""
    asc = torch.sort(scores.to(torch.float64).flip(0), stable=True).values
    return torch.cat([torch.zeros(1, dtype=torch.float64), asc.cumsum(0)])


def plan_heads(
    groups: torch.Tensor, queries: torch.Tensor, kv_keep: int, r_keep: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(kept KV heads, kept query heads group-major, cost): the lowest groups go whole, then the lowest
    query heads inside every kept group, the same number in each."""
    kv = groups.numel()
    r = queries.numel() // kv
    kept_groups = keep_top(groups, kv_keep)
    cost = float(groups.sum() - groups[kept_groups].sum())
    kept_q = []
    for g in kept_groups.tolist():
        q = queries[g * r : (g + 1) * r]
        top = keep_top(q, r_keep)
        cost += float(q.sum() - q[top].sum())
        kept_q.append(top + g * r)
    return kept_groups, torch.cat(kept_q), cost


def width_steps(shape: Shape, multiple: int) -> list[dict[str, int]]:
    """The channel widths structured pruning may give, widest first: every group keeps the same share of
    its channels as the first group, each a multiple of `multiple` (rounded down), none empty."""
    (first, full), *_ = shape.widths
    steps = [shape.width]
    for k in range((full - 1) // multiple * multiple, 0, -multiple):
        w = {g: (width * k // full) // multiple * multiple for g, width in shape.widths}
        if min(w.values()) >= 1:
            steps.append(w)
    return steps


def widths_at(shape: Shape, keep: float, multiple: int) -> dict[str, int]:
    """The widths an explicit keep_channels ratio gives; refused if a group would keep no channel."""
    w = {g: (int(width * keep) // multiple) * multiple for g, width in shape.widths}
    empty = next((g for g, v in w.items() if v < 1), None)
    if empty is not None:
        raise ConfigError(
            f"keep_channels {keep} keeps no channel of {shape.width[empty]} ({empty}, in multiples of {multiple})"
        )
    return w


@dataclass
class _Removal:
    """What a shape costs: the estimated loss increase of the units it removes and the parameters it
    keeps, from the per-layer removal curves. A shape is (layers removed, head option, widths, experts)."""

    shape: Shape
    costs: UnitCosts
    groups: list[str]  # each MLP's width group
    layer_order: list[int] | None  # layers, lowest score first (None: layers are not removed)
    layer_curve: torch.Tensor | None
    head_cost: dict[tuple[int, int], list[float]]  # head option (KV heads, queries per group) -> per layer
    channel_curves: list[list[torch.Tensor]] | None  # per layer, per MLP (None: channels are not removed)
    expert_curves: list[torch.Tensor] | None  # per layer (None: experts are not removed)

    @classmethod
    def of(cls, shape: Shape, costs: UnitCosts, scores: list[LayerScores], kinds, opts, groups) -> _Removal:
        layer_order = layer_curve = None
        if "layers" in kinds:
            layer_scores = torch.tensor([s.layer for s in scores], dtype=torch.float64)
            layer_order = torch.sort(layer_scores, stable=True).indices.tolist()  # lowest first
            layer_curve = removal_curve(layer_scores)
        head_cost = {o: [0.0] * shape.layers for o in opts}
        if "heads" in kinds:
            for o in opts:
                head_cost[o] = [plan_heads(s.groups, s.queries, *o)[2] for s in scores]
        channels = [[removal_curve(c) for c in s.channels] for s in scores] if "channels" in kinds else None
        experts = [removal_curve(s.experts) for s in scores] if "experts" in kinds else None
        return cls(shape, costs, groups, layer_order, layer_curve, head_cost, channels, experts)

    def cost(self, n: int, opt: tuple[int, int], widths: dict[str, int], experts: int) -> float:
        removed = set(self.layer_order[:n]) if n else set()
        c = float(self.layer_curve[n]) if n else 0.0
        full = self.shape.width
        for i in range(self.shape.layers):
            if i in removed:
                continue
            c += self.head_cost[opt][i]
            if self.channel_curves is not None:
                c += sum(float(curve[full[g] - widths[g]]) for curve, g in zip(self.channel_curves[i], self.groups,
                                                                               strict=True))  # fmt: skip
            if self.expert_curves is not None:
                c += float(self.expert_curves[i][self.shape.experts - experts])
        return c

    def params(self, n: int, opt: tuple[int, int], widths: dict[str, int], experts: int) -> int:
        return (self.shape.layers - n) * self.costs.layer(widths, opt[0] * opt[1], opt[0], experts)

    def candidate(self, n: int, opt: tuple[int, int], widths: dict[str, int], experts: int) -> dict:
        return {"layers_removed": n, "kv_heads": opt[0], "group": opt[1], "widths": dict(widths),
                "experts": experts, "params": self.params(n, opt, widths, experts),
                "cost": self.cost(n, opt, widths, experts)}  # fmt: skip


def _from_keeps(removal: _Removal, opts, keeps: dict[str, float], multiple: int, least_experts: int) -> dict:
    """The shape explicit keep ratios ask for."""
    shape = removal.shape
    n = shape.layers - max(1, int(shape.layers * keeps["layers"])) if "layers" in keeps else 0
    opt = (shape.kv_heads, shape.heads // shape.kv_heads)
    if "heads" in keeps:
        want = shape.heads * keeps["heads"]
        opt = min(
            opts, key=lambda o: (abs(o[0] * o[1] - want), removal.cost(0, o, shape.width, shape.experts))
        )
    widths = widths_at(shape, keeps["channels"], multiple) if "channels" in keeps else shape.width
    experts = experts_kept(shape, keeps["experts"], least_experts) if "experts" in keeps else shape.experts
    return removal.candidate(n, opt, widths, experts)


def _head_rounding(keeps: dict[str, float], best: dict, shape: Shape, opts) -> str | None:
    """What rounding keep_heads to a head count the config class accepts did, when it changed the count
    (0.75 of 4 heads in 2 KV groups can only be 4 or 2, and the tie keeps all 4); None otherwise."""
    want, kept = shape.heads * keeps["heads"], best["kv_heads"] * best["group"]
    if abs(kept - want) < 1e-9:
        return None
    counts = ", ".join(str(n) for n in sorted({kv * r for kv, r in opts}, reverse=True))
    outcome = "nothing is removed" if kept == shape.heads else f"{shape.heads - kept} removed per layer"
    return (f"keep_heads {keeps['heads']:g} asks for {want:g} of {shape.heads} query heads, but {shape.kv_heads} "
            f"KV group(s) allow {counts} heads per layer: {kept} kept, {outcome}")  # fmt: skip


def _largest_within(removal: _Removal, budget: float, n: int, opt, steps: list, experts: int):
    """The widest step whose parameters fit the budget (parameters fall with every step), or None."""
    lo, hi = 0, len(steps) - 1
    if removal.params(n, opt, steps[hi], experts) > budget:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if removal.params(n, opt, steps[mid], experts) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return steps[lo]


def _within(removal: _Removal, kinds, opts, budget: float, multiple: int, least_experts: int) -> list[dict]:
    """Every shape within `budget` parameters; with channels (or experts), each keeps as many as fit."""
    shape, cands = removal.shape, []
    steps = width_steps(shape, multiple) if "channels" in kinds else [shape.width]
    expert_counts = range(shape.experts, least_experts - 1, -1) if "experts" in kinds else [shape.experts]
    for n in range(shape.layers) if "layers" in kinds else [0]:
        for opt in opts:
            for experts in expert_counts:
                widths = _largest_within(removal, budget, n, opt, steps, experts)
                if widths is not None:
                    cands.append(removal.candidate(n, opt, widths, experts))
                    break
    return cands


def check_reachable(shape: Shape, costs: UnitCosts, kinds, options, target: float, multiple: int, structure: str,
                    least_experts: int) -> None:  # fmt: skip
    """Refuse a parameter target no shape of these kinds reaches: needs only the costs, so it is checked
    when the run is planned, before any statistic is gathered."""
    opts = options if "heads" in kinds else [(shape.kv_heads, shape.heads // shape.kv_heads)]
    narrowest = width_steps(shape, multiple)[-1] if "channels" in kinds else shape.width
    layers_removed = [shape.layers - 1] if "layers" in kinds else [0]
    experts = least_experts if "experts" in kinds else shape.experts
    dense = shape.layers * costs.layer(shape.width, shape.heads, shape.kv_heads, shape.experts)
    smallest = min((shape.layers - n) * costs.layer(narrowest, o[0] * o[1], o[0], experts)
                   for n in layers_removed for o in opts)  # fmt: skip
    if smallest > target * dense:
        raise ConfigError(
            f"structure {structure!r} can remove at most {1 - smallest / dense:.1%} of the decoder parameters, "
            f"but target_params {target:g} asks for {1 - target:.1%}: use another structure or a larger target"
        )


def experts_kept(shape: Shape, keep: float, least: int) -> int:
    """The experts per layer keep_experts keeps (rounded down); refused below each token's top-k."""
    kept = int(shape.experts * keep + 1e-9)
    if kept < least:
        raise ConfigError(
            f"keep_experts {keep} keeps {kept} of {shape.experts} experts per layer, fewer than the {least} "
            "each token is routed to (num_experts_per_tok)"
        )
    return kept


def choose(
    shape: Shape,
    costs: UnitCosts,
    scores: list[LayerScores],
    kinds: tuple[str, ...],
    options: list[tuple[int, int]],
    *,
    target: float | None = None,
    keeps: dict[str, float] | None = None,
    multiple: int = 1,
    structure: str = "",
    groups: list[str] | None = None,
    least_experts: int = 1,
) -> Choice:
    """The shape and the kept units of every layer, for a parameter `target` (fraction of decoder
    parameters kept) or explicit `keeps` ratios per kind. `groups`: each MLP's width group (default: one
    MLP of the first group); `least_experts`: the fewest experts a layer may keep (its top-k)."""
    groups = groups or [shape.widths[0][0]]
    opts = options if "heads" in kinds else [(shape.kv_heads, shape.heads // shape.kv_heads)]
    removal = _Removal.of(shape, costs, scores, kinds, opts, groups)
    if keeps:
        best = _from_keeps(removal, opts, keeps, multiple, least_experts)
        choice = _finish(best, scores, removal.layer_order, [best], shape, groups)
        note = _head_rounding(keeps, best, shape, opts) if "heads" in keeps else None
        if note is not None:
            choice.notes.append(note)
            log.warning("warning: %s", note)
        return choice
    dense = shape.layers * costs.layer(shape.width, shape.heads, shape.kv_heads, shape.experts)
    cands = _within(removal, kinds, opts, target * dense, multiple, least_experts)
    if not cands:
        check_reachable(shape, costs, kinds, options, target, multiple, structure, least_experts)
        raise RuntimeError("no shape fits the target, yet the smallest does")  # check_reachable raised
    if structure == "mixed":
        cands.sort(key=lambda c: (c["cost"], -c["params"]))
    else:
        cands.sort(key=lambda c: (-c["params"], c["cost"]))
    return _finish(cands[0], scores, removal.layer_order, cands[:8], shape, groups)


def _finish(
    best: dict, scores: list[LayerScores], layer_order, cands: list[dict], shape: Shape, groups
) -> Choice:
    n = best["layers_removed"]
    removed = sorted(layer_order[:n]) if n else []
    choice = Choice(removed, best["widths"], best["kv_heads"], best["group"], best["experts"],
                    params_after=best["params"], cost=best["cost"], candidates=cands)  # fmt: skip
    full = shape.width
    for i, s in enumerate(scores):
        if i in removed:
            continue
        if best["widths"] != full:
            choice.channels[i] = [keep_top(c, best["widths"][g]) for c, g in zip(s.channels, groups,
                                                                                  strict=True)]  # fmt: skip
        if (best["kv_heads"], best["group"]) != (shape.kv_heads, shape.heads // shape.kv_heads):
            choice.groups[i], choice.queries[i], _ = plan_heads(
                s.groups, s.queries, best["kv_heads"], best["group"]
            )
        if best["experts"] != shape.experts:
            choice.kept_experts[i] = keep_top(s.experts, best["experts"])
    return choice
