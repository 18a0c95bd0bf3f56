"""The layer-wise executor: prune a model one decoder block at a time, as SparseGPT and Wanda do.

1. Statistics that need the whole model (gradients, the per-token Fisher, the dense activations an
   allocation or SparseGPT's prior reads) are gathered first, in one pass of the calibration loop, and
   the per-tensor budgets are fixed from them (uniform, OWL, or the global scope's exact counts).
2. Every decoder block's own call is recorded (`blocks.capture_block_inputs`): blocks may be called
   differently (Gemma's sliding and full attention layers). Before a block runs, its own mask and
   rotary embeddings are swapped in (`BlockCalls.use_block`). For each decoder
   block, forward hooks gather what its targets need per group (Hessians for updates, activations for
   wanda-like scores) while the recorded inputs run through it; the group is pruned by
   `plan.prune_stage`; then the block runs again and its outputs, computed by the already-pruned block,
   become the next block's inputs. With `sequential: false` the outputs are taken before pruning
   (statistics of the dense model). `true_sequential` splits a block into stages, each its own group,
   calibrated after the stages before it.

Only one group's statistics are alive at a time. With several processes (a replicated model) each rank
records its own micro-batches; a group's statistics are summed across ranks before it is pruned, so
every rank applies the same update and the replicas stay identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.loop import reduce_counters_, reduce_statistics_, to_device
from ..calibration.stats import Statistics, make_statistics
from ..errors import ConfigError
from ..offload import BlockStore
from ..plan import Plan, PruneResult, Record, RunInputs, Timer, build_report, prune_stage, resolve_budgets
from ..reconstruction.block import refit_block_
from ..status import set_stage
from ..targets import block_list_prefix
from .blocks import (
    call_stages,
    capture_with_store,
    dense_outputs,
    hidden_states_of,
    run_block,
    run_block_backward,
    run_block_until,
    split_by_block,
)
from .whole_model import statistics_of

Calls = list[tuple[tuple, dict]]  # the recorded (args, kwargs) of a decoder block, one per micro-batch


def _batches_on_every_rank(batches: Iterable[Any] | None, plan: Plan) -> list[Any]:
    if batches is None:
        raise ValueError("layer-wise pruning needs calibration batches")
    batches = list(batches)
    coll = plan.collective
    if coll.sum_scalars([float(len(batches))], "min")[0] == 0:
        raise ConfigError(
            f"layer-wise mode needs calibration data on every process, but a rank got no micro-batch "
            f"({coll.processes} processes): use more samples or fewer processes"
        )
    return batches


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    prefix = block_list_prefix(model)
    if prefix is None:
        raise ConfigError("layer-wise mode needs a model with a list of repeated blocks (none found)")
    return prefix, model.get_submodule(prefix)


def _count_what_layers_read(counters: dict[str, Any], calls: Calls, batches: list, plan: Plan) -> None:
    """With no calibration pass (nothing read the whole model): batches and tokens the layers read."""
    tokens = sum(int(hidden_states_of(a, k).shape[:-1].numel()) for a, k in calls)
    counters.update({"batches": len(batches), "tokens": tokens})
    reduce_counters_(counters, plan.collective)


@dataclass
class _LayerPruning:
    """Pruning one decoder layer after another: what every layer's groups are pruned with."""

    plan: Plan
    weights: dict[str, torch.Tensor]
    budgets: dict[str, float]
    scope: str
    whole: Statistics  # the whole-model statistics
    record: Record
    timer: Timer
    device: torch.device
    stages_per_layer: list[int] = field(default_factory=list)
    block_refits: list[dict] = field(default_factory=list)  # per block: loss per token before and after

    def prune_layer_(self, layer: nn.Module, targets: dict[str, nn.Module], calls: Calls) -> None:
        """Prune `layer`'s targets (in stages with `true_sequential`), refit the block (`block_steps`);
        with `sequential` its outputs, from the pruned layer, replace the recorded hidden states."""
        sequential = self.plan.cfg.sequential is not False
        refit = self.plan.cfg.block_steps > 0 and bool(targets)
        if refit:  # the dense block's outputs on the inputs it is pruned on, before any weight changes
            inputs = list(calls)
            with self.timer("block_refit"):
                dense = dense_outputs(layer, inputs, self.device)
        if targets:
            # true_sequential: the layer's targets in stages of modules sharing one input (q/k/v, o,
            # gate/up, down); each stage's statistics are taken after the stages before it are pruned
            stages = (
                call_stages(layer, targets, calls[:1], self.device) if self.plan.cfg.true_sequential else None
            )
            self.stages_per_layer.append(len(stages) if stages else 1)
            for names in stages or [list(targets)]:
                until = targets[names[-1]] if stages is not None else None
                self._prune_stage_(
                    {n: targets[n] for n in names}, layer, calls, until, keep_outputs=not sequential
                )
        if refit:
            with self.timer("block_refit"):
                self.block_refits.append(self._refit_(layer, targets, inputs, dense))
        if sequential or not targets:
            with self.timer("layer_forward"):
                run_block(layer, calls, self.device, keep_outputs=True)

    def _refit_(self, layer: nn.Module, targets: dict, inputs: Calls, dense: list[torch.Tensor]) -> dict:
        cfg, coll = self.plan.cfg, self.plan.collective
        params = list({id(t.param): t.param for t in targets.values()}.values())
        return refit_block_(
            layer, params, inputs, dense, steps=cfg.block_steps, lr=cfg.block_lr, loss=cfg.block_loss,
            move=lambda c: (to_device(c[0], self.device), to_device(c[1], self.device)),
            sum_=lambda ts: coll.sum_(ts), total_tokens=lambda n: coll.sum_scalars([n])[0],
        )  # fmt: skip

    def _prune_stage_(self, modules: dict[str, nn.Module], layer: nn.Module, calls: Calls,
                      until: nn.Module | None, keep_outputs: bool) -> None:  # fmt: skip
        """Gather the group's statistics from the recorded inputs (up to `until`, or the whole layer),
        sum them across ranks, and prune the group."""
        plan = self.plan
        stats = make_statistics(plan.stage_stats, modules)
        with self.timer("layer_statistics"):
            regional = stats.by_source.get("blockgrad")
            if regional is not None:  # its own pass, with autograd, on the stage's current block
                regional.attach()
                try:
                    run_block_backward(layer, calls, self.device)
                finally:
                    regional.detach()
            forward = [acc for source, acc in stats.by_source.items() if source != "blockgrad"]
            for acc in forward:
                acc.attach()
            try:
                if until is None:
                    run_block(layer, calls, self.device, keep_outputs=keep_outputs)
                else:
                    run_block_until(layer, calls, self.device, until)
            finally:
                for acc in forward:
                    acc.detach()
            reduce_statistics_(stats, plan.collective, chunk_elems=plan.cfg.select_chunk_elems)
        with self.timer("prune"):
            names = [m.key for m in modules.values()]
            coll = plan.collective
            owners = coll.owners({n: self.weights[n].numel() for n in names})
            mine = [n for n in names if owners[n] == coll.rank]
            prune_stage(plan, mine, self.weights, self.budgets, self.scope, self.record, stage=stats,
                        whole=self.whole)  # fmt: skip
            if "hessian" in stats.by_source:
                stats.by_source["hessian"].free()
        if coll.processes > 1:
            with self.timer("share"):
                _share_results(coll, names, owners, self.weights, self.record)


def _share_results(coll, names: list[str], owners: dict[str, int], weights: dict, record: Record) -> None:
    """After each rank solved its share of a group: every rank gets every pruned tensor (and its mask)
    from its owner, and the owners' report entries, so the replicas stay identical."""
    coll.share_({n: weights[n] for n in names}, owners)
    if record.keep_masks:
        masks = {n: (record.masks[n] if owners[n] == coll.rank else torch.zeros(weights[n].shape, dtype=torch.bool))
                 .to(weights[n].device) for n in names}  # fmt: skip
        coll.share_(masks, owners)
        record.masks.update({n: m.cpu() for n, m in masks.items()})
    mine = {n: (record.per_tensor[n], record.hessian_bytes.get(n), record.routed_tokens.get(n))
            for n in names if owners[n] == coll.rank}  # fmt: skip
    for part in coll.gather_objects(mine):
        for n, (per, hessian, routed) in part.items():
            record.per_tensor[n] = per
            if hessian is not None:
                record.hessian_bytes[n] = hessian
            if routed is not None:
                record.routed_tokens[n] = routed


def run(model: nn.Module, plan: Plan, inputs: RunInputs) -> PruneResult:
    accelerator, loss_fn, return_masks = inputs.accelerator, inputs.loss_fn, inputs.return_masks
    cfg, coll = plan.cfg, plan.collective
    batches = _batches_on_every_rank(inputs.batches, plan)
    store = inputs.offload
    device = (store.device if store is not None else accelerator.device if accelerator is not None
              else next(model.parameters()).device)  # fmt: skip
    store = store or BlockStore(device)
    prefix, layers = _decoder_layers(model)
    per_layer = split_by_block(plan.targets, prefix, len(layers))
    weights = {t.key: t.weight.data for t in plan.targets.values()}
    for p in model.parameters():
        p.requires_grad_(False)

    timer = Timer()
    whole, counters = statistics_of(plan, model, dataclasses.replace(inputs, batches=batches))
    timer.timings["calibration"] = counters["seconds"]
    with timer("budgets"):
        budgets, scope, allocation = resolve_budgets(plan, weights, whole)
    store.release_all(model, prefix)  # the whole model was needed up to here; now one block at a time

    was_training = model.training
    model.eval()
    with timer("capture_inputs"):
        host = torch.device("cpu") if cfg.offload_inputs else None
        calls = capture_with_store(model, prefix, layers, batches, loss_fn, device, store, host)
    if not counters["batches"]:
        _count_what_layers_read(counters, calls, batches, plan)
    pruning = _LayerPruning(
        plan, weights, budgets, scope, whole, Record(keep_masks=return_masks), timer, device
    )
    main = (accelerator is None or accelerator.is_local_main_process) and coll.rank == 0
    try:
        for index, layer in enumerate(tqdm(layers, desc="layer-wise pruning", unit="block",
                                           disable=not (cfg.progress and main))):  # fmt: skip
            set_stage(f"layer-wise pruning, block {index + 1} of {len(layers)}")
            with timer("offload_fetch"):
                store.fetch(index, layer)
            weights.update({t.key: t.weight.data for t in per_layer[index].values()})
            calls.use_block(index)  # this block's own mask and rotary embeddings, the current hidden states
            pruning.prune_layer_(layer, per_layer[index], calls)
            with timer("offload_release"):
                store.release(index, layer)
            # the block's entries now point where its weights live (meta under offload disk): the dict
            # must not keep a released block's tensors alive
            weights.update({t.key: t.weight.data for t in per_layer[index].values()})
    finally:
        model.train(was_training)
    del calls
    timer.timings["total"] = sum(timer.timings.values())
    record = pruning.record
    mode = {"stages_per_block": pruning.stages_per_layer}
    if cfg.block_steps:
        mode["block_refit"] = {"steps": cfg.block_steps, "lr": cfg.block_lr, "loss": cfg.block_loss,
                               "per_block": pruning.block_refits}  # fmt: skip
    report = build_report(plan, record, counters, whole, timer.timings, device=device, allocation=allocation,
                          mode=mode)  # fmt: skip
    return PruneResult(masks=record.masks if return_masks else None, report=report)
