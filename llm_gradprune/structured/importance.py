"""Importance of whole units (MLP channels, attention heads and KV groups, decoder layers): pure functions.

Higher = more important = kept. Every score of one importance is on one scale for every kind of unit,
so `mixed` can rank channels against heads against layers when that scale is an estimated loss
increase (`loss_scale`).

Two forms for the gradient importances (LLM-Pruner's element-wise and vector-wise, Ma et al. 2023):

- element: a per-weight statistic summed over the unit's weights (for a channel its gate and up rows and
  its down column; for a query head its q rows and o columns, a KV group adds its k and v rows; for a
  layer all its projections): taylor sum |w E_b[g]|, fisher sum w^2 E_b[g^2], token_fisher sum
  w^2 E_t[(dL/dy x)^2];
- vector: the gradient of removing the unit as a whole. With a gate m on the unit's output (the
  consuming projection's input columns for channels and heads, the block's residual update for a layer),
  z = dL/dm = sum over those columns and tokens of x * dL/dx, the first-order loss change of removing it
  is -z and the second-order one z^2 / 2: taylor |E_b[z]|, fisher E_b[z^2] over micro-batches,
  token_fisher E_t[z_t^2] per token. A KV group's z is the sum of its query heads' z (its k/v head feeds
  only them), so its fisher is the sum of a block of the heads' z z^T matrix, not of its diagonal.

Activation-only: flap, FLAP's fluctuation (An et al. 2024): Var_t(x_j) ||W[:, j]||^2 of the consuming
projection's input column j (a head sums its columns); block_influence for layers, ShortGPT's
1 - E_t[cos(h_in, h_out)] (Men et al. 2024). Baseline: magnitude, the L2 norm of the unit's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import Registry

FORMS = ("vector", "element")
KINDS = ("channels", "heads", "layers", "experts")
ATTENTION = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")


@dataclass
class Geometry:
    """One layer's attention layout: query heads, KV heads, head dimension."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class UnitMeans:
    """One layer's unit statistics as means (from `unitstats.UnitStats.means`); None where not gathered.
    Channel entries are lists, one per MLP of the layer (the dense MLP; each expert, the shared expert)."""

    ch_mean: list[torch.Tensor] | None = None  # [I] E_t[x] of each down_proj's input
    ch_var: list[torch.Tensor] | None = None  # [I] Var_t[x]
    hd_mean: torch.Tensor | None = None  # [H * hd] of o_proj's input
    hd_var: torch.Tensor | None = None
    cos: float | None = None  # E_t[cos(h_in, h_out)] of the block
    ch_z: list[torch.Tensor] | None = None  # [I] E_b[z]
    ch_zz: list[torch.Tensor] | None = None  # [I] E_b[z^2]
    ch_tt: list[torch.Tensor] | None = None  # [I] E_t[z_t^2]
    hd_z: torch.Tensor | None = None  # [H]
    hd_zz: torch.Tensor | None = None  # [H, H] E_b[z z^T]
    hd_tt: torch.Tensor | None = None  # [H, H] E_t[z_t z_t^T]
    blk_z: float | None = None
    blk_zz: float | None = None
    blk_tt: float | None = None
    ex_freq: torch.Tensor | None = None  # [E] share of the layer's tokens routed to each expert
    ex_reap: torch.Tensor | None = None  # [E] E over its routed tokens of weight * ||expert output||
    ex_z: torch.Tensor | None = None  # [E] E_b[z] of the expert's removal gate
    ex_zz: torch.Tensor | None = None
    ex_tt: torch.Tensor | None = None


@dataclass
class LayerTensors:
    """One tensor per unit matrix of a layer (its weights, or a per-weight statistic), by role: the
    attention's q, k, v, o and each MLP's gate, up, down; `experts` is each MLP's expert index."""

    attn: dict[str, torch.Tensor]
    mlps: list[dict[str, torch.Tensor]]
    experts: list[int | None]

    def map(self, fn, other: LayerTensors | None = None) -> LayerTensors:
        """fn(t) or fn(t, other's t) of every tensor."""

        def one(t, o):
            return fn(t) if other is None else fn(t, o)

        attn = {r: one(t, None if other is None else other.attn[r]) for r, t in self.attn.items()}
        mlps = [{r: one(t, None if other is None else other.mlps[m][r]) for r, t in d.items()}
                for m, d in enumerate(self.mlps)]  # fmt: skip
        return LayerTensors(attn, mlps, self.experts)


@dataclass
class LayerScores:
    """Scores of one layer's units: channels [I] of each MLP, query heads [H] (removed inside their
    group), KV groups [kv] (removed whole), the layer itself, and its routed experts [E]."""

    channels: list[torch.Tensor] | None = None
    queries: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    layer: float | None = None
    experts: torch.Tensor | None = None


# -- aggregation over a unit's weights ------------------------------------------------------------
def channel_sums(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Per MLP channel j: sum of a per-weight tensor over gate row j, up row j and down column j."""
    return gate.sum(dim=1) + up.sum(dim=1) + down.sum(dim=0)


def head_sums(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, geo: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query head [H]: its q rows + its o columns, per KV head [kv]: its k rows + its v rows)."""
    hd = geo.head_dim
    per_q = q.reshape(geo.heads, hd, -1).sum(dim=(1, 2)) + o.reshape(o.shape[0], geo.heads, hd).sum(
        dim=(0, 2)
    )
    per_kv = k.reshape(geo.kv_heads, hd, -1).sum(dim=(1, 2)) + v.reshape(geo.kv_heads, hd, -1).sum(dim=(1, 2))
    return per_q, per_kv


def group_sum(per_query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum of the query heads of each KV group (query heads are group-major, as repeat_kv lays them out)."""
    return per_query.reshape(kv_heads, -1).sum(dim=1)


def group_block_sum(pair: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per KV group g: 1^T M_gg 1, the sum of the block of a [H, H] second-moment matrix over its heads."""
    r = pair.shape[0] // kv_heads
    blocks = pair.reshape(kv_heads, r, kv_heads, r)
    return torch.stack([blocks[g, :, g, :].sum() for g in range(kv_heads)])


def expert_sums(t: LayerTensors) -> torch.Tensor | None:
    """Per routed expert: the sum of a per-weight tensor over its matrices ([E], by expert index)."""
    per = {e: sum(float(m[r].sum()) for r in MLP_ROLES) for m, e in zip(t.mlps, t.experts, strict=True)
           if e is not None}  # fmt: skip
    return torch.tensor([per[e] for e in sorted(per)], dtype=torch.float64) if per else None


def element_scores(t: LayerTensors, geo: Geometry, root: bool = False) -> LayerScores:
    """Scores from a per-weight tensor of each matrix (|w g|, w^2 g^2, w^2, ...) summed over each unit;
    `root` takes the square root of every sum (an L2 norm from w^2)."""
    a = t.attn
    ch = [channel_sums(m["gate"], m["up"], m["down"]) for m in t.mlps]
    per_q, per_kv = head_sums(a["q"], a["k"], a["v"], a["o"], geo)
    groups = group_sum(per_q, geo.kv_heads) + per_kv
    layer = float(sum(x.sum() for x in [*a.values(), *(m[r] for m in t.mlps for r in MLP_ROLES)]))
    experts = expert_sums(t)
    if root:
        return LayerScores([c.sqrt() for c in ch], per_q.sqrt(), groups.sqrt(), layer**0.5,
                           None if experts is None else experts.sqrt())  # fmt: skip
    return LayerScores(ch, per_q, groups, layer, experts)


# -- the per-weight tensors of the element forms and the baseline ----------------------------------
def magnitude_weights(w: torch.Tensor) -> torch.Tensor:
    return w.square()


def taylor_weights(w: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
    return (w * grad_mean).abs()


def fisher_weights(w: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    return w.square() * sq_mean


# -- vector forms and activation scores from unit statistics ----------------------------------------
def vector_scores(u: UnitMeans, geo: Geometry, kind: str) -> LayerScores:
    """taylor |E_b z|, fisher E_b z^2 or token_fisher E_t z_t^2 of each unit's removal gate."""
    if kind == "taylor":
        return LayerScores([z.abs() for z in u.ch_z], u.hd_z.abs(), group_sum(u.hd_z, geo.kv_heads).abs(),
                           abs(u.blk_z), None if u.ex_z is None else u.ex_z.abs())  # fmt: skip
    fisher = kind == "fisher"
    pair, ch, blk, ex = (
        (u.hd_zz, u.ch_zz, u.blk_zz, u.ex_zz) if fisher else (u.hd_tt, u.ch_tt, u.blk_tt, u.ex_tt)
    )
    return LayerScores([c.clone() for c in ch], torch.diagonal(pair).clone(), group_block_sum(pair, geo.kv_heads),
                       blk, None if ex is None else ex.clone())  # fmt: skip


def flap_scores(u: UnitMeans, downs: list[torch.Tensor], o: torch.Tensor, geo: Geometry) -> LayerScores:
    """Var_t(x_j) * ||W[:, j]||^2 of the consuming projection's input columns; a head sums its columns."""
    ch = [var * down.square().sum(dim=0) for var, down in zip(u.ch_var, downs, strict=True)]
    cols = u.hd_var * o.square().sum(dim=0)
    per_q = cols.reshape(geo.heads, geo.head_dim).sum(dim=1)
    return LayerScores(ch, per_q, group_sum(per_q, geo.kv_heads), None)


def block_influence(cos_mean: float) -> float:
    """ShortGPT's block influence: 1 - E_t[cos(h_in, h_out)]; a block that barely turns its input is cheap."""
    return 1.0 - cos_mean


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Importance:
    """A registered unit importance. `weight_stat`: the per-weight statistic its element form reads
    (a `calibration.stats.STATISTICS` name); `forms`: the forms it has (none: one fixed form)."""

    name: str
    help: str
    kinds: tuple[str, ...]
    loss_scale: bool  # an estimated loss increase: comparable across kinds of unit
    forms: tuple[str, ...] = ()
    weight_stat: str | None = None
    per_weight: Callable[..., torch.Tensor] | None = None

    def supports(self, kind: str) -> bool:
        return kind in self.kinds

    def resolve_form(self, form: str | None) -> str | None:
        if form is None:
            return self.forms[0] if self.forms else None
        if form not in FORMS:
            raise ConfigError(f"importance_form {form!r} is unknown: choose one of {', '.join(FORMS)}")
        if form not in self.forms:
            raise ConfigError(
                f"importance_form {form!r} does not apply to importance {self.name!r}, which has one form only"
            )
        return form

    def weight_needs(self, form: str | None) -> set[str]:
        """Per-weight statistics (gather_statistics) this importance reads."""
        return {self.weight_stat} if form == "element" and self.weight_stat else set()

    def unit_needs(self, form: str | None) -> str | None:
        """Unit statistics it reads: "backward" (removal gradients), "forward" (moments, cosines, routing)
        or None."""
        if self.forms and form == "vector":
            return "backward"
        return "forward" if self.name in ("flap", "block_influence", "reap", "frequency") else None

    def scores(
        self,
        form: str | None,
        weights: LayerTensors,
        geo: Geometry,
        stats: LayerTensors | None = None,
        unit: UnitMeans | None = None,
    ) -> LayerScores:
        """Every unit score of one layer from its fp32 weights, the per-weight statistic of the element
        form and its unit means."""
        if self.name == "magnitude":
            return element_scores(weights.map(magnitude_weights), geo, root=True)
        if self.name == "flap":
            return flap_scores(unit, [m["down"] for m in weights.mlps], weights.attn["o"], geo)
        if self.name == "block_influence":
            return LayerScores(layer=block_influence(unit.cos))
        if self.name == "reap":
            return LayerScores(experts=unit.ex_reap.clone())
        if self.name == "frequency":
            return LayerScores(experts=unit.ex_freq.clone())
        if form == "element":
            return element_scores(weights.map(self.per_weight, stats), geo)
        return vector_scores(unit, geo, self.name)


IMPORTANCES: Registry[Importance] = Registry("importance")
for _imp in (
    Importance("fisher", "E_b[z^2] of a unit's removal gradient (vector) or sum w^2 E_b[g^2] (element)",
               KINDS, True, FORMS, "grad_sq_mean", fisher_weights),
    Importance("token_fisher", "E_t[z_t^2], the per-token Fisher of a unit's output (vector), or sum "
               "w^2 E_t[(dL/dy x)^2] (element)", KINDS, True, FORMS, "token_grad_sq_mean", fisher_weights),
    Importance("taylor", "|E_b[z]|, first-order loss change of removing a unit (vector), or sum |w E_b[g]| "
               "(element)", KINDS, True, FORMS, "grad_mean", taylor_weights),
    Importance("flap", "FLAP fluctuation Var_t(x_j) ||W[:, j]||^2 of the consuming projection's inputs "
               "(activations only)", ("channels", "heads"), False),
    Importance("block_influence", "ShortGPT's 1 - E_t[cos(h_in, h_out)] of a block (activations only)",
               ("layers",), False),
    Importance("reap", "REAP: mean over an expert's routed tokens of its router weight times the norm of "
               "its output (activations only)", ("experts",), False),
    Importance("frequency", "share of the calibration tokens the router sends to an expert", ("experts",),
               False),
    Importance("magnitude", "L2 norm of a unit's weights (no calibration)", ("channels", "heads", "experts"),
               False),
):  # fmt: skip
    IMPORTANCES.add(_imp.name, _imp)
