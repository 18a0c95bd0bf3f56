"""Layer-wise sparsity allocation: uniform, or OWL (outlier-weighted layerwise sparsity).

OWL (Yin et al., 2024): a layer's outlier ratio D_l is the fraction of its Wanda scores |w| * rms(x)
above M times the layer's mean score. Layers with more outliers keep more weights: densities are
spread linearly in D over [1 - s - lambda, 1 - s + lambda] and shifted so the size-weighted mean
density is exactly 1 - s. All targets of a layer share its sparsity.

Pure maths on numbers and score tensors; the plan turns the result into per-tensor budgets. Each
allocation is one registration (`ALLOCATIONS`) that declares its parameters and the statistics it reads. `exact_sparsities` then rounds per tensor so that the total number of
pruned target weights equals round(s * total) exactly whenever the scope's granularity allows it
(per tensor: always; per row: when the remainder is a multiple of some tensor's row count).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..registry import Param, Registry, resolve_params
from ..selection.select import num_to_prune
from .criteria import wanda

Reduce = Callable[[list[float]], list[float]]


def layer_key(name: str) -> str:
    """The decoder layer a weight belongs to: its name up to the first numeric part.

    `model.layers.3.mlp.up_proj.weight` -> `model.layers.3`; a name without one is its own layer.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def group_by_layer(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(layer_key(n), []).append(n)
    return groups


def outlier_ratio(
    scores: Callable[[], Iterable[torch.Tensor]], m: float, reduce: Reduce | None = None
) -> float:
    """Fraction of all scores > m * (mean of all scores). `scores` is called twice (mean, then count).

    `reduce` sums a list of numbers across processes that each hold some rows of the scores."""
    total, count = 0.0, 0
    for s in scores():
        total += float(s.double().sum())
        count += s.numel()
    if reduce is not None:
        total, count = reduce([total, float(count)])
    if count == 0:
        return 0.0
    limit = m * total / count
    above = float(sum(int((s > limit).sum()) for s in scores()))
    if reduce is not None:
        (above,) = reduce([above])
    return above / count


def owl_densities(
    ratios: dict[str, float], sizes: dict[str, int], sparsity: float, lam: float
) -> dict[str, float]:
    """Per-layer density (1 - sparsity) in about [1-s-lam, 1-s+lam], more for more outliers.

    Size-weighted mean density is 1 - s (before clamping to [0, 1], which only bites for extreme s).
    """
    layers = list(ratios)
    d = torch.tensor([ratios[k] for k in layers], dtype=torch.float64)
    w = torch.tensor([sizes[k] for k in layers], dtype=torch.float64)
    spread = float(d.max() - d.min()) if len(layers) else 0.0
    if spread <= 0:
        dens = torch.full_like(d, 1.0 - sparsity)
    else:
        dens = (1.0 - sparsity) + lam * (2.0 * (d - d.min()) / spread - 1.0)
        dens = dens + ((1.0 - sparsity) - (dens * w).sum() / w.sum())
    dens = dens.clamp(0.0, 1.0)
    return {k: float(v) for k, v in zip(layers, dens, strict=True)}


def exact_sparsities(
    wanted: dict[str, float], shapes: dict[str, tuple[int, int]], sparsity: float, scope: str
) -> dict[str, float]:
    """Per-tensor sparsities close to `wanted` that together prune round(s * total) weights.

    `shapes` are (rows, row length). The tensor scope prunes whole weights, the row scope the same
    count in every row of a tensor, so a tensor's count moves in steps of 1 or of its row count. The
    first rounding is to nearest; the remainder is then settled one step at a time on the tensor
    whose count is furthest from its wish in that direction.
    """
    if scope not in ("tensor", "row"):
        raise ValueError(f"a per-tensor allocation needs the tensor or row scope, not {scope!r}")
    names = list(wanted)
    step = {n: (shapes[n][0] if scope == "row" else 1) for n in names}
    slots = {n: (shapes[n][1] if scope == "row" else shapes[n][0] * shapes[n][1]) for n in names}
    ideal = {n: wanted[n] * slots[n] for n in names}
    units = {n: min(slots[n], max(0, math.floor(ideal[n] + 0.5))) for n in names}
    total = sum(shapes[n][0] * shapes[n][1] for n in names)
    left = num_to_prune(sparsity, total) - sum(units[n] * step[n] for n in names)
    while left != 0:
        sign = 1 if left > 0 else -1
        ok = [
            n for n in names if step[n] <= abs(left) and (units[n] < slots[n] if sign > 0 else units[n] > 0)
        ]
        if not ok:
            break  # the remainder is finer than any tensor's step: as close as this scope allows
        best = max(ok, key=lambda n: sign * (ideal[n] - units[n]) / slots[n])
        units[best] += sign
        left -= sign * step[best]
    return {n: units[n] / slots[n] for n in names}


def owl_sparsities(
    score_fn: Callable[[str], torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    sparsity: float,
    scope: str,
    m: float = 5.0,
    lam: float = 0.08,
    reduce: Reduce | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """OWL per-tensor sparsities from per-tensor outlier scores (Wanda's), and a per-layer summary."""
    groups = group_by_layer(shapes)
    ratios = {
        layer: outlier_ratio(lambda names=names: (score_fn(n) for n in names), m, reduce)
        for layer, names in groups.items()
    }
    sizes = {layer: sum(shapes[n][0] * shapes[n][1] for n in names) for layer, names in groups.items()}
    dens = owl_densities(ratios, sizes, sparsity, lam)
    wanted = {n: 1.0 - dens[layer] for layer, names in groups.items() for n in names}
    per_tensor = exact_sparsities(wanted, shapes, sparsity, scope)
    summary = {layer: {"outlier_ratio": ratios[layer], "sparsity": 1.0 - dens[layer]} for layer in groups}
    return per_tensor, summary


# -- the registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    """How the target sparsity is spread over the decoder layers."""

    name: str
    help: str
    params: dict[str, Param] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # mean statistics of the dense model it reads
    check: Callable[[dict[str, Any], float], None] | None = None  # params against the target sparsity

    def resolve_params(self, given: dict[str, Any] | None, sparsity: float) -> dict[str, Any]:
        params = resolve_params(f"allocation {self.name!r}", self.params, given)
        if self.check is not None:
            self.check(params, sparsity)
        return params


def _check_owl(params: dict[str, Any], sparsity: float) -> None:
    """Layer sparsities span [s - lambda, s + lambda]: both ends must stay in [0, 1)."""
    lam = params["lambda"]
    if lam > sparsity or lam >= 1.0 - sparsity:
        raise ConfigError(
            f"allocation 'owl' parameter lambda {lam:g} lets a layer's sparsity leave [0, 1) around "
            f"sparsity {sparsity:g}: use lambda <= {sparsity:g} and < {1.0 - sparsity:g}"
        )


ALLOCATIONS: Registry[Allocation] = Registry("allocation")
ALLOCATIONS.add("uniform", Allocation("uniform", "every target gets the same sparsity"))
ALLOCATIONS.add(
    "owl",
    Allocation(
        "owl",
        "outlier-weighted layerwise sparsity (Yin et al., 2024): layers with more Wanda-score outliers keep more",
        {
            "m": Param(5.0, "a score above m x its layer's mean Wanda score is an outlier"),
            "lambda": Param(0.08, "layer sparsities spread over [sparsity - lambda, sparsity + lambda]"),
        },
        needs=("act_sq_mean",),
        check=_check_owl,
    ),
)


def allocate(
    name: str,
    params: dict[str, Any],
    weights: dict[str, torch.Tensor],
    act_sq_mean: Callable[[str], torch.Tensor] | None,
    shapes: dict[str, tuple[int, int]],
    sparsity: float,
    scope: str,
    reduce: Reduce | None = None,
) -> tuple[float | dict[str, float], dict[str, Any] | None]:
    """(sparsity or per-tensor sparsities, per-layer summary) of the allocation `name`.

    OWL reads Wanda scores |w| * rms(x) whatever the criterion (Yin et al., 2024); `weights` may hold
    this rank's rows only (then `reduce` sums across ranks and `shapes` are the global shapes)."""
    if name == "uniform":
        return sparsity, None
    return owl_sparsities(
        lambda n: wanda(weights[n].detach().float(), act_sq_mean(n)),
        shapes, sparsity, scope, m=params["m"], lam=params["lambda"], reduce=reduce,
    )  # fmt: skip
