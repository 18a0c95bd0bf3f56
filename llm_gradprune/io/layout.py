"""Where each pruned matrix lands in the checkpoint files.

transformers 5 saves some models in their original layout, not the one they hold in memory: a fused
expert parameter `mlp.experts.gate_up_proj [E, 2I, H]` is written back as per-expert tensors
(`block_sparse_moe.experts.3.w1.weight` and `...w3.weight` for Mixtral), or renamed. The report names
matrices as the model holds them, so that the zero counts can be checked against the files, each
such matrix is mapped here to the file tensors (or expert slices of one) that hold exactly its weights.

The mapping is learned from transformers' own reverse conversion applied to a tensor of element
indices, one parameter at a time: whatever the conversion does (split, rename, transpose), each
written tensor then says which weights of the parameter it holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Piece = tuple[str, int | None]  # a file tensor, or one expert slice of a 3-D file tensor


def _revert(model: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older transformers save as they hold
        return {name: tensor}
    return dict(revert_weight_conversion(model, {name: tensor}))


def _owners(targets: list, param: torch.Tensor) -> torch.Tensor:
    """For every element of the parameter, the index of the target holding it (-1: none)."""
    owner = torch.full(param.shape, -1, dtype=torch.int64)
    for i, t in enumerate(targets):
        t.matrix(owner).fill_(i)
    return owner


def _pieces_of(written: dict[str, torch.Tensor], owner: torch.Tensor) -> dict[int, list[Piece]]:
    """{target index: the written tensors or expert slices made only of its weights}."""
    flat = owner.reshape(-1)
    found: dict[int, list[Piece]] = {}
    for key, idx in written.items():
        slices = [(None, idx)] if idx.dim() != 3 else [(e, idx[e]) for e in range(idx.shape[0])]
        whole = flat[idx.reshape(-1)].unique()
        if idx.dim() == 3 and len(whole) == 1:
            slices = [(None, idx)]
        for expert, part in slices:
            held = flat[part.reshape(-1)].unique()
            if len(held) == 1 and int(held) >= 0:
                found.setdefault(int(held), []).append((key, expert))
    return found


def stored_layout(model: nn.Module, keys: list[str]) -> dict[str, list[list[Any]]]:
    """{report key: [[file tensor, expert or None], ...]} for the pruned matrices that are not written
    as the tensor of the same name; empty when the model is saved as it is held."""
    from ..targets import all_matrices

    by_key = {t.key: t for t in all_matrices(model)[0]}
    by_param: dict[str, list] = {}
    for key in keys:
        t = by_key.get(key)
        if t is not None:
            by_param.setdefault(t.tensor_name, []).append(t)
    out: dict[str, list[list[Any]]] = {}
    for pname, targets in by_param.items():
        param = targets[0].param
        shape_only = _revert(model, pname, torch.empty(param.shape, device="meta"))
        if list(shape_only) == [pname] and targets[0].expert is None:
            continue  # written under its own name: the report's key is the file's
        idx = torch.arange(param.numel(), dtype=torch.int64).view(param.shape)
        found = _pieces_of(_revert(model, pname, idx), _owners(targets, param))
        for i, t in enumerate(targets):
            out[t.key] = [list(p) for p in found.get(i, [])]
    return out


def stored_shapes(model: nn.Module) -> dict[str, list[int]]:
    """{file tensor: shape} of every tensor `save_pretrained` writes for the model's state dict, through
    the same reverse conversion (a fused expert stack becomes its per-expert tensors)."""
    out: dict[str, list[int]] = {}
    for name, t in model.state_dict().items():
        written = _revert(model, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        out.update({k: list(v.shape) for k, v in written.items()})
    return out
