"""Update rules: what happens to a layer's kept weights once its mask is fixed (`reconstruct`).

Each rule is one registration: `apply(weight, H, mask, blocksize, percdamp) -> info` changes the weight
in place (pruned entries end exactly 0, the mask is never changed) and returns what the report records.
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


def _none(weight: torch.Tensor, H, mask: torch.Tensor, blocksize: int, percdamp: float) -> dict:
    apply_mask_(weight, mask)
    return {}


def _obs(weight: torch.Tensor, H, mask: torch.Tensor, blocksize: int, percdamp: float) -> dict:
    return obs_update_(weight, H, mask, blocksize=blocksize, percdamp=percdamp)


def _lsq(weight: torch.Tensor, H, mask: torch.Tensor, blocksize: int, percdamp: float) -> dict:
    return lsq_update_(weight, H, mask, percdamp=percdamp)


UPDATES: Registry[UpdateRule] = Registry("reconstruct")
for _rule in (
    UpdateRule("none", "zero the masked weights; the kept ones are unchanged", False, _none),
    UpdateRule("obs", "SparseGPT's left-to-right OBS updates of the kept weights (layer-wise)", True, _obs),
    UpdateRule(
        "lsq",
        "exact per-row least-squares refit of the kept weights (one |kept|^3 solve per row; layer-wise)",
        True,
        _lsq,
    ),
):
    UPDATES.add(_rule.name, _rule)
