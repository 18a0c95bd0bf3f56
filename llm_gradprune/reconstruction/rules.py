"""Update rules: what happens to a layer's kept weights once its mask is fixed (`reconstruct`).

Each rule is one registration: `apply(weight, H, mask, blocksize, percdamp) -> info` changes the weight
in place (pruned entries end exactly 0, the mask is never changed) and returns what the report records;
`cost(rows, cols)` is its relative time on one [rows, cols] matrix, which deals a layer-wise group's
tensors to the processes (`Collective.owners`) and scales the dry run's probe.

Costs are in units of one weight of an OBS column loop (about 0.3 us per weight on one CPU thread,
whatever the width: measured 0.31 s for 1024 x 1024, 0.75 s for 4096 x 1024, 2.6 s for 1024 x 4096).
The Hessian factorisation adds about cols^3 / 13000 of them (1.7 s at cols = 4096), and lsq's conjugate
gradients about rows x cols^2 / 300 (0.7 s at 1024 x 1024, 1.9 s at 4096 x 1024, 25 s at 1024 x 4096:
its iterations are [rows, cols] x [cols, cols] matmuls, and more of them on the wider Hessian).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry
from ..selection.masks import apply_mask_
from .lsq import lsq_update_
from .obs import obs_update_


@dataclass(frozen=True)
class UpdateRule:
    name: str
    help: str
    needs_hessian: bool
    apply: Callable[..., dict]
    cost: Callable[[int, int], float]  # (rows, cols) -> relative time, see the module's docstring


def factor_cost(cols: int) -> float:
    """The Hessian factorisation of a [cols, cols] Hessian, in the units above."""
    return cols**3 / 13000


def obs_cost(rows: int, cols: int) -> float:
    """The OBS column loop (SparseGPT's too) with its factorisation."""
    return rows * cols + factor_cost(cols)


def _lsq_cost(rows: int, cols: int) -> float:
    return rows * cols * cols / 300 + factor_cost(cols)


def _none(weight: torch.Tensor, H, mask: torch.Tensor, blocksize: int, percdamp: float) -> dict:
    apply_mask_(weight, mask)
    return {}


def _obs(weight: torch.Tensor, H, mask: torch.Tensor, blocksize: int, percdamp: float) -> dict:
    return obs_update_(weight, H, mask, blocksize=blocksize, percdamp=percdamp)


def _lsq(weight: torch.Tensor, H, mask: torch.Tensor, blocksize: int, percdamp: float) -> dict:
    return lsq_update_(weight, H, mask, percdamp=percdamp)


UPDATES: Registry[UpdateRule] = Registry("reconstruct")
for _rule in (
    UpdateRule(
        "none", "zero the masked weights; the kept ones are unchanged", False, _none, lambda r, c: 0.0
    ),
    UpdateRule(
        "obs", "SparseGPT's left-to-right OBS updates of the kept weights (layer-wise)", True, _obs, obs_cost
    ),
    UpdateRule(
        "lsq",
        "exact per-row least-squares refit of the kept weights (one |kept|^3 solve per row; layer-wise)",
        True,
        _lsq,
        _lsq_cost,
    ),
):
    UPDATES.add(_rule.name, _rule)
