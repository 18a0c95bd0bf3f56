"""The same run twice gives the same bytes (issue 23): the layer-wise 2:4 recipe path (sparsegpt,
true_sequential, lsq) and the whole-model path, at a fixed thread count, and the report records that
count (results at another thread count may differ in the last bits: BLAS reductions split otherwise)."""

from __future__ import annotations

import pytest
import torch

from llm_gradprune import PruneConfig, prune_

from .conftest import make_blocks, make_tiny_llama

RUNS = {
    "recipe_2of4": {
        "criterion": "sparsegpt",
        "pattern": "2:4",
        "true_sequential": True,
        "reconstruct": "lsq",
    },
    "recipe_50": {"criterion": "sparsegpt", "reconstruct": "lsq"},
    "token_fisher": {"criterion": "token_fisher"},
}


@pytest.mark.parametrize("run", list(RUNS))
def test_the_same_run_twice_gives_the_same_bytes(run):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs, reports = [], []
        for _ in range(2):
            model = make_tiny_llama()
            reports.append(
                prune_(
                    model, list(make_blocks(8, 16).split(2)), PruneConfig(progress=False, **RUNS[run])
                ).report
            )
            outs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(before)
    for name, p in outs[0].items():
        assert torch.equal(p, outs[1][name]), name
    assert reports[0]["calibration"]["threads"] == 2
