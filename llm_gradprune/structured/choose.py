"""Choosing what to remove: one shape for every layer, the units within each layer by their scores.

Widths are uniform (the saved config is a plain one, which holds one intermediate_size and one head
count), so the choice is (layers removed, KV heads kept, query heads kept per group, channels kept per
layer). For a parameter target, every combination the config class accepts is tried and the channels
fill what remains: a single-kind structure takes the shape nearest the target from below; `mixed`
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
    intermediate: int
    kv_heads: int
    group: int  # query heads kept per KV group
    channels: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept channels, ascending
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept query heads, group-major
    groups: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept KV heads, ascending
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


def _channels_for(budget: float, costs: UnitCosts, heads: int, kv: int, shape: Shape, multiple: int) -> int:
    """Most channels a layer may keep within `budget` parameters (a multiple of `multiple`, at most all)."""
    room = budget - costs.fixed - heads * costs.query - kv * costs.kv
    k = int(room // costs.channel)
    if k >= shape.intermediate:
        return shape.intermediate
    return (k // multiple) * multiple


@dataclass
class _Removal:
    """What a shape costs: the estimated loss increase of the units it removes and the parameters it
    keeps, from the per-layer removal curves. A shape is (layers removed, head option, channels kept)."""

    shape: Shape
    costs: UnitCosts
    layer_order: list[int] | None  # layers, lowest score first (None: layers are not removed)
    layer_curve: torch.Tensor | None
    head_cost: dict[tuple[int, int], list[float]]  # head option (KV heads, queries per group) -> per layer
    channel_curves: list[torch.Tensor] | None  # per layer (None: channels are not removed)

    @classmethod
    def of(cls, shape: Shape, costs: UnitCosts, scores: list[LayerScores], kinds, opts) -> _Removal:
        layer_order = layer_curve = None
        if "layers" in kinds:
            layer_scores = torch.tensor([s.layer for s in scores], dtype=torch.float64)
            layer_order = torch.sort(layer_scores, stable=True).indices.tolist()  # lowest first
            layer_curve = removal_curve(layer_scores)
        head_cost = {o: [0.0] * shape.layers for o in opts}
        if "heads" in kinds:
            for o in opts:
                head_cost[o] = [plan_heads(s.groups, s.queries, *o)[2] for s in scores]
        channel_curves = [removal_curve(s.channels) for s in scores] if "channels" in kinds else None
        return cls(shape, costs, layer_order, layer_curve, head_cost, channel_curves)

    def cost(self, n: int, opt: tuple[int, int], inter: int) -> float:
        removed = set(self.layer_order[:n]) if n else set()
        c = float(self.layer_curve[n]) if n else 0.0
        for i in range(self.shape.layers):
            if i in removed:
                continue
            c += self.head_cost[opt][i]
            if self.channel_curves is not None:
                c += float(self.channel_curves[i][self.shape.intermediate - inter])
        return c

    def params(self, n: int, opt: tuple[int, int], inter: int) -> int:
        return (self.shape.layers - n) * self.costs.layer(inter, opt[0] * opt[1], opt[0])

    def candidate(self, n: int, opt: tuple[int, int], inter: int) -> dict:
        return {"layers_removed": n, "kv_heads": opt[0], "group": opt[1], "intermediate": inter,
                "params": self.params(n, opt, inter), "cost": self.cost(n, opt, inter)}  # fmt: skip


def _from_keeps(removal: _Removal, opts, keeps: dict[str, float], multiple: int) -> dict:
    """The shape explicit keep ratios ask for."""
    shape = removal.shape
    n = shape.layers - max(1, int(shape.layers * keeps["layers"])) if "layers" in keeps else 0
    opt = (shape.kv_heads, shape.heads // shape.kv_heads)
    if "heads" in keeps:
        want = shape.heads * keeps["heads"]
        opt = min(opts, key=lambda o: (abs(o[0] * o[1] - want), removal.cost(0, o, shape.intermediate)))
    inter = shape.intermediate
    if "channels" in keeps:
        inter = (int(shape.intermediate * keeps["channels"]) // multiple) * multiple
        if inter < 1:
            raise ConfigError(
                f"keep_channels {keeps['channels']} keeps no channel of {shape.intermediate} "
                f"(in multiples of {multiple})"
            )
    return removal.candidate(n, opt, inter)


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


def _within(removal: _Removal, kinds, opts, budget: float, multiple: int) -> list[dict]:
    """Every shape within `budget` parameters; with channels, each keeps as many as fit."""
    shape, cands = removal.shape, []
    for n in range(shape.layers) if "layers" in kinds else [0]:
        for opt in opts:
            inter = shape.intermediate
            if "channels" in kinds:
                per_layer = budget / (shape.layers - n)
                inter = _channels_for(per_layer, removal.costs, opt[0] * opt[1], opt[0], shape, multiple)
                if inter < 1:
                    continue
            if removal.params(n, opt, inter) <= budget:
                cands.append(removal.candidate(n, opt, inter))
    return cands


def _unreachable(removal: _Removal, kinds, opts, dense: int, target: float, multiple: int, structure: str):
    shape = removal.shape
    least = multiple if "channels" in kinds else shape.intermediate
    layers_removed = [shape.layers - 1] if "layers" in kinds else [0]
    smallest = min(removal.params(n, o, least) for n in layers_removed for o in opts)
    return ConfigError(
        f"structure {structure!r} can remove at most {1 - smallest / dense:.1%} of the decoder parameters, "
        f"but target_params {target:g} asks for {1 - target:.1%}: use another structure or a larger target"
    )


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
) -> Choice:
    """The shape and the kept units of every layer, for a parameter `target` (fraction of decoder
    parameters kept) or explicit `keeps` ratios per kind."""
    opts = options if "heads" in kinds else [(shape.kv_heads, shape.heads // shape.kv_heads)]
    removal = _Removal.of(shape, costs, scores, kinds, opts)
    if keeps:
        best = _from_keeps(removal, opts, keeps, multiple)
        choice = _finish(best, scores, removal.layer_order, [best], shape)
        note = _head_rounding(keeps, best, shape, opts) if "heads" in keeps else None
        if note is not None:
            choice.notes.append(note)
            log.warning("warning: %s", note)
        return choice
    dense = shape.layers * costs.layer(shape.intermediate, shape.heads, shape.kv_heads)
    cands = _within(removal, kinds, opts, target * dense, multiple)
    if not cands:
        raise _unreachable(removal, kinds, opts, dense, target, multiple, structure)
    if structure == "mixed":
        cands.sort(key=lambda c: (c["cost"], -c["params"]))
    else:
        cands.sort(key=lambda c: (-c["params"], c["cost"]))
    return _finish(cands[0], scores, removal.layer_order, cands[:8], shape)


def _finish(best: dict, scores: list[LayerScores], layer_order, cands: list[dict], shape: Shape) -> Choice:
    n = best["layers_removed"]
    removed = sorted(layer_order[:n]) if n else []
    choice = Choice(removed, best["intermediate"], best["kv_heads"], best["group"],
                    params_after=best["params"], cost=best["cost"], candidates=cands)  # fmt: skip
    for i, s in enumerate(scores):
        if i in removed:
            continue
        if best["intermediate"] < shape.intermediate:
            choice.channels[i] = keep_top(s.channels, best["intermediate"])
        if (best["kv_heads"], best["group"]) != (shape.kv_heads, shape.heads // shape.kv_heads):
            choice.groups[i], choice.queries[i], _ = plan_heads(
                s.groups, s.queries, best["kv_heads"], best["group"]
            )
    return choice
