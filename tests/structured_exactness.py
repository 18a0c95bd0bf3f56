"""The exactness table of docs/FAMILIES.md: max |logit difference| between the shrunk model and the dense
model with the removed units zeroed (channels: every MLP's down_proj columns; heads: o_proj columns) or
never routed to (experts: their router logits -inf), per family, at half the channels, heads or experts,
with no compensation. The same comparisons are asserted in tests/test_structured_families.py.

    python -m tests.structured_exactness
"""

from __future__ import annotations

import copy

import torch

from llm_gradprune.structured import StructureConfig, find_units, shrink_

from .families import BY_NAME, STRUCTURED
from .test_structured_families import _batches, _logits, _removed, _RoutersOff

RUNS = {"channels": {"structure": "channels", "keep_channels": 0.5, "channel_multiple": 1},
        "heads": {"structure": "heads", "keep_heads": 0.5}}  # fmt: skip


def _zero_removed_(dense, report: dict, kind: str) -> None:
    units = find_units(dense)
    hd = units.shape.head_dim
    with torch.no_grad():
        if kind == "channels":
            for i, removed in report["removed"]["channels"].items():
                per = removed if isinstance(removed, dict) else {units.layers[i].mlps[0].name: removed}
                for m in units.layers[i].mlps:
                    m.down.weight[:, per[m.name]] = 0
            return
        for i, kept in report["removed"]["query_heads_kept"].items():
            for h in _removed(kept, units.shape.heads):
                units.layers[i].attn["o"].weight[:, h * hd : (h + 1) * hd] = 0


def difference(name: str, kind: str) -> float:
    """max |logits(shrunk) - logits(dense with the removed units silenced)| of one family and kind."""
    dense = BY_NAME[name].build().eval()
    model = copy.deepcopy(dense)
    x = _batches(dense.config.vocab_size, seed=2)[0]
    calib = _batches(dense.config.vocab_size)
    if kind == "experts":
        with _RoutersOff(model, [0, 2]):
            ref = _logits(model, x)
            shrink_(model, calib, StructureConfig(structure="experts", keep_experts=0.5, importance="reap"),
                    progress=False)  # fmt: skip
        return float((_logits(model, x) - ref).abs().max())
    report = shrink_(model, calib, StructureConfig(compensate="none", **RUNS[kind]), progress=False)
    _zero_removed_(dense, report, kind)
    return float((_logits(model, x) - _logits(dense, x)).abs().max())


def main() -> None:
    print("| family | channels | heads | experts |\n|---|---|---|---|")
    for name, kinds in STRUCTURED.items():
        cells = [
            f"{difference(name, k):.1e}" if k in kinds else "-" for k in ("channels", "heads", "experts")
        ]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
