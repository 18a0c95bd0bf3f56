"""The layer-wise executor: prune a model one decoder block at a time, as SparseGPT and Wanda do.

1. Statistics that need the whole model (gradients, the per-token Fisher, the dense activations an
   allocation or SparseGPT's prior reads) are gathered first, in one pass of the calibration loop, and
   the per-tensor budgets are fixed from them (uniform, OWL, or the global scope's exact counts).
2. The first block's inputs are recorded (`blocks.capture_block_inputs`). For each block, forward hooks
   gather what its targets need per group (Hessians for updates, activations for wanda-like scores)
   while the recorded inputs run through it; the group is pruned by `plan.prune_group`; then the block
   runs again and its outputs, computed by the already-pruned block, become the next block's inputs.
   With `sequential: false` the outputs are taken before pruning (statistics of the dense model).
   `true_sequential` splits a block into stages, each calibrated after the stages before it.

Only one group's statistics are alive at a time. With several processes (a replicated model) each rank
records its own micro-batches; a group's statistics are summed across ranks before it is pruned, so
every rank applies the same update and the replicas stay identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.loop import LossFn, causal_lm_loss, reduce_counters_, reduce_statistics_
from ..calibration.stats import make_statistics
from ..errors import ConfigError
from ..plan import Plan, PruneResult, Record, Timer, build_report, prune_group, resolve_budgets
from ..status import set_stage
from ..targets import block_list_prefix
from .blocks import _hidden, call_stages, capture_block_inputs, run_block, run_block_until, split_by_block
from .whole_model import statistics_of


def run(
    model: nn.Module,
    batches: Iterable[Any] | None,
    plan: Plan,
    *,
    loss_fn: LossFn = causal_lm_loss,
    accelerator=None,
    return_masks: bool = True,
    num_batches: int | None = None,
    calib_state=None,
    statistics=None,
) -> PruneResult:
    cfg, coll = plan.cfg, plan.collective
    if batches is None:
        raise ValueError("layer-wise pruning needs calibration batches")
    batches = list(batches)
    fewest = coll.sum_scalars([float(len(batches))], "min")[0]
    if fewest == 0:
        raise ConfigError(
            f"layer-wise mode needs calibration data on every process, but a rank got no micro-batch "
            f"({coll.processes} processes): use more samples or fewer processes"
        )
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    prefix = block_list_prefix(model)
    if prefix is None:
        raise ConfigError("layer-wise mode needs a model with a list of repeated blocks (none found)")
    layers = model.get_submodule(prefix)
    per_block = split_by_block(plan.targets, prefix, len(layers))
    weights = {f"{n}.weight": m.weight.data for n, m in plan.targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)

    timer = Timer()
    whole, counters = statistics_of(plan, model, batches, loss_fn=loss_fn, accelerator=accelerator,
                                    num_batches=num_batches, calib_state=calib_state, statistics=statistics)  # fmt: skip
    timer.timings["calibration"] = counters["seconds"]
    with timer("budgets"):
        budgets, scope, allocation = resolve_budgets(plan, weights, whole)

    was_training = model.training
    model.eval()
    with timer("capture_inputs"):
        store = torch.device("cpu") if cfg.offload_inputs else None
        calls = capture_block_inputs(model, layers[0], batches, loss_fn=loss_fn, device=device, store=store)
    if not counters["batches"]:  # no calibration pass ran: count what the blocks read
        tokens = sum(int(_hidden(a, k).shape[:-1].numel()) for a, k in calls)
        counters.update({"batches": len(batches), "tokens": tokens})
        reduce_counters_(counters, coll)

    record = Record(keep_masks=return_masks)
    sequential = cfg.sequential is not False
    stages_per_block: list[int] = []
    main = (accelerator is None or accelerator.is_local_main_process) and coll.rank == 0
    try:
        for index, block in enumerate(tqdm(layers, desc="layer-wise pruning", unit="block",
                                           disable=not (cfg.progress and main))):  # fmt: skip
            set_stage(f"layer-wise pruning, block {index + 1} of {len(layers)}")
            block_targets = per_block[index]
            if not block_targets:
                with timer("layer_forward"):
                    run_block(block, calls, device, keep_outputs=True)
                continue
            # true_sequential: the block's targets in stages of modules sharing one input (q/k/v, o,
            # gate/up, down); each stage's statistics are taken after the stages before it are pruned
            stages = call_stages(block, block_targets, calls[:1], device) if cfg.true_sequential else None
            stages_per_block.append(len(stages) if stages else 1)
            for group_names in stages or [list(block_targets)]:
                mods = {n: block_targets[n] for n in group_names}
                group = make_statistics(plan.group_stats, mods)
                with timer("layer_statistics"):
                    for acc in group.accumulators():
                        acc.attach()
                    try:
                        if stages is None:
                            run_block(block, calls, device, keep_outputs=not sequential)
                        else:
                            run_block_until(block, calls, device, block_targets[group_names[-1]])
                    finally:
                        for acc in group.accumulators():
                            acc.detach()
                    reduce_statistics_(group, coll, chunk_elems=cfg.select_chunk_elems)
                with timer("prune"):
                    names = [f"{n}.weight" for n in group_names]
                    prune_group(plan, names, weights, budgets, scope, record, group=group, whole=whole)
                    if "hessian" in group.by_source:
                        group.by_source["hessian"].free()
            if sequential:
                with timer("layer_forward"):
                    run_block(block, calls, device, keep_outputs=True)
    finally:
        model.train(was_training)
    del calls
    timer.timings["total"] = sum(timer.timings.values())
    mode = {"stages_per_block": stages_per_block}
    report = build_report(plan, record, counters, whole, timer.timings, allocation=allocation, mode=mode,
                          device=device)  # fmt: skip
    return PruneResult(masks=record.masks if return_masks else None, report=report)
