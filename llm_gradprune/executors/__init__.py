"""The library entry point `prune_`, and the one place that decides which executor runs.

    from llm_gradprune import PruneConfig, prune_
    result = prune_(model, batches, PruneConfig(criterion="fisher", sparsity=0.5))

Works for any `nn.Module`: pass `loss_fn(model, batch)` for models that are not causal LMs and
`targets` (or include/exclude patterns in the config) to choose the layers. A model whose parameters
are FSDP2 DTensors is pruned shard by shard; every rank then passes all micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..calibration.loop import LossFn, causal_lm_loss
from ..calibration.stats import Statistics
from ..config import PruneConfig
from ..parallel import collective_for, default_threads
from ..plan import PruneResult, RunInputs, make_plan
from . import layer_wise, whole_model

# executor name (plan.executor) -> its run function; row shards are the whole-model executor with the
# RowShards collective
EXECUTORS = {"whole_model": whole_model.run, "layer_wise": layer_wise.run, "sharded": whole_model.run}


def prune_(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    cfg: PruneConfig | None = None,
    *,
    loss_fn: LossFn = causal_lm_loss,
    targets: dict[str, nn.Module] | None = None,
    accelerator=None,
    return_masks: bool = True,
    num_batches: int | None = None,
    calib_state=None,
    statistics: Statistics | None = None,
    already_pruned: dict[str, torch.Tensor] | None = None,
    nm_cap: tuple[int, int] | None = None,
    offload=None,
) -> PruneResult:
    """Calibrate (if the criterion needs it), score, select, update and zero the target weights in place.

    `statistics`: whole-model statistics filled before (e.g. `io.stats_files.load_statistics`), so a
    sweep calibrates once; layer-wise mode still needs `batches` for its block-by-block pass. Returned
    masks hold this rank's rows when the model is row-sharded; report counts are global. `calib_state`
    (io.calib_state.CalibState) saves and resumes the calibration pass. `already_pruned` (True = pruned,
    by weight name) are pruned again whatever their scores and `nm_cap` keeps an N:M pattern reachable:
    what pruning in rounds (`rounds`) needs. `offload` (an `offload.BlockStore`): where a layer-wise
    run keeps the blocks between their turns (default: all on the device). A row-sharded (FSDP2) model in
    layer-wise mode needs an `offload.DiskStore`: after its whole-model statistics its rows are freed
    (emptied) and the pruned blocks are the ones the store writes, not the model passed in.
    """
    cfg = cfg or PruneConfig()
    plan = make_plan(model, cfg, targets, collective_for(model), resume=calib_state is not None)
    plan.already_pruned, plan.nm_cap = already_pruned, nm_cap
    before = torch.get_num_threads()
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    try:
        inputs = RunInputs(batches, loss_fn, accelerator, return_masks, num_batches, calib_state, statistics,
                           offload)  # fmt: skip
        result = EXECUTORS[plan.executor](model, plan, inputs)
    finally:
        torch.set_num_threads(before)
    result.report["calibration"]["threads"] = threads
    return result
