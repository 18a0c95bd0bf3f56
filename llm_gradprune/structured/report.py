"""The report of one `shrink_` run: shapes, parameter counts, the units removed, compensation, timings."""

from __future__ import annotations

import torch

from .choose import Choice
from .importance import IMPORTANCES
from .units import Shape


def build_report(cfg, old: Shape, new: Shape, before, after, choice: Choice, refits, passes, timings,
                 mlps: list[tuple[str, int]]) -> dict:  # fmt: skip
    """`mlps`: (name, width) of each MLP of a layer, as `choice.channels` lists them."""
    import transformers

    def mean_of(key: str) -> dict:
        vals = [r[p][key] for r in refits.values() for p in r]
        return {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else {}

    return {
        "structure": cfg.structure,
        "config": cfg.to_dict(),
        "importance": {
            "name": cfg.importance,
            "form": cfg.importance_form,
            "loss_scale": IMPORTANCES.get(cfg.importance).loss_scale,
        },  # fmt: skip
        "shape_before": old.to_dict(),
        "shape_after": new.to_dict(),
        "params_before": before,
        "params_after": after,
        "decoder_kept": after["decoder"] / before["decoder"],
        "removed": {
            "layers": choice.removed_layers,
            "channels_per_layer": old.widths[0][1] - new.widths[0][1],
            "channels_per_group": {g: w - new.width[g] for g, w in old.widths},
            "query_heads_per_layer": old.heads - new.heads,
            "kv_heads_per_layer": old.kv_heads - new.kv_heads,
            "experts_per_layer": old.experts - new.experts,
            "channels": {i: _channels(kept, mlps) for i, kept in choice.channels.items()},
            "kv_heads_kept": {i: k.tolist() for i, k in choice.groups.items()},
            "query_heads_kept": {i: k.tolist() for i, k in choice.queries.items()},
            "experts_kept": {i: k.tolist() for i, k in choice.kept_experts.items()},
        },
        "estimated_cost": choice.cost,
        "candidates": choice.candidates,
        "notes": list(getattr(choice, "notes", [])),  # e.g. what the head rounding did
        "compensation": {
            "compensate": cfg.compensate,
            "refit_inputs": cfg.refit_inputs,
            "mean_bias": cfg.mean_bias,
            "removed_error": mean_of("removed_error"),
            "error": mean_of("error"),
            "layers": refits,
        },  # fmt: skip
        "calibration": passes,
        "timings": timings,
        "transformers": transformers.__version__,
    }


def _channels(kept: list[torch.Tensor], mlps: list[tuple[str, int]]) -> list[int] | dict[str, list[int]]:
    """The channels removed from a layer: a list for its one MLP, else {MLP name: list}."""
    lists = {n: _removed(k, width) for (n, width), k in zip(mlps, kept, strict=True)}
    return next(iter(lists.values())) if len(lists) == 1 else lists


def _removed(kept: torch.Tensor, n: int) -> list[int]:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept.cpu()] = False
    return torch.nonzero(mask).squeeze(1).tolist()
