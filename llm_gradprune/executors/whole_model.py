"""The whole-model executor: one calibration pass over every target, then one group of all targets.

With the replicated collective each rank folds its own micro-batches and the sums are added once; with
row shards (FSDP2, `parallel/fsdp.py`) every rank folds its rows of every micro-batch gradient and
selects over its rows with thresholds shared through histograms. Nothing else differs.
"""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from ..calibration.loop import empty_counters, gather_statistics
from ..errors import ConfigError
from ..plan import Plan, PruneResult, Record, RunInputs, Timer, build_report, prune_stage, resolve_budgets
from ..status import set_stage


def statistics_of(plan: Plan, model: nn.Module, inputs: RunInputs):
    """The whole-model calibration pass a plan asks for: (statistics, counters); resume counters added.

    `statistics` already filled (`io.stats_files.load_statistics`, or an earlier pass) are used as
    they are, once checked to hold everything the plan reads."""
    cfg, statistics, calib_state = plan.cfg, inputs.statistics, inputs.calib_state
    if statistics is not None:
        missing = sorted(s for s in plan.whole_stats if not statistics.has(s))
        if missing:
            raise ConfigError(f"the given statistics lack {', '.join(missing)}, which this run reads")
        counters = {**empty_counters(), **statistics.counters, "seconds": 0.0}
        return statistics, counters
    stats, counters = gather_statistics(
        model, inputs.batches, plan.whole_stats, plan.targets, collective=plan.collective,
        stats_device="cpu" if cfg.stats_device == "cpu" else None, grad_accum=cfg.grad_accum,
        checkpointing=cfg.gradient_checkpointing, chunk_elems=cfg.select_chunk_elems, loss_fn=inputs.loss_fn,
        accelerator=inputs.accelerator, progress=cfg.progress, num_batches=inputs.num_batches, calib_state=calib_state,
    )  # fmt: skip
    if calib_state is not None:
        counters["resumed_from_batch"] = calib_state.resumed_from
        counters["state_saves"] = calib_state.saves
    return stats, counters


def run(model: nn.Module, plan: Plan, inputs: RunInputs) -> PruneResult:
    accelerator, return_masks = inputs.accelerator, inputs.return_masks
    timer = Timer()
    stats, counters = statistics_of(plan, model, inputs)
    timer.timings["calibration"] = counters["seconds"]
    coll = plan.collective
    weights = {t.key: coll.local(t.weight, t.key) for t in plan.targets.values()}
    set_stage("selecting the masks")
    with timer("budgets"):
        budgets, scope, allocation = resolve_budgets(plan, weights, stats)
    record = Record(keep_masks=return_masks)
    main = (accelerator is None or accelerator.is_local_main_process) and coll.rank == 0
    with timer("prune"), tqdm(total=len(weights), desc="select+mask", unit="tensor",
                              disable=not (plan.cfg.progress and main)) as bar:  # fmt: skip
        prune_stage(plan, plan.names, weights, budgets, scope, record, whole=stats, progress=bar.update)
    timer.timings["total"] = sum(timer.timings.values())
    device = accelerator.device if accelerator is not None else next(iter(weights.values())).device
    report = build_report(plan, record, counters, stats, timer.timings, allocation=allocation, device=device)
    return PruneResult(masks=record.masks if return_masks else None, report=report)
