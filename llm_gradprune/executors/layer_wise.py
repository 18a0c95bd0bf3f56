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

Only one group's statistics are alive at a time. With several processes (a replicated model) the work
is shared and the result is one process's, bit for bit: every rank records every micro-batch's block
inputs (`_every_batch`, in one process's order); each group's tensors are dealt to the ranks
(`Collective.owners`), each rank gathers the statistics of its own tensors over every micro-batch and
solves them, and the pruned tensors, masks and report entries are broadcast from their owners. A
block's outputs are computed one micro-batch per rank in turn and broadcast. The block refit runs on
every rank over every micro-batch (summing per-rank gradients would round differently). The
whole-model statistics before the layer-wise pass are still each rank's micro-batches summed across
ranks, so a gradient criterion's scores agree with one process's up to rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..calibration.data import merge_round_robin_chunks
from ..calibration.loop import to_device
from ..calibration.stats import BLOCK_OBJECTIVES, STATISTICS, Statistics, make_statistics
from ..errors import ConfigError
from ..offload import BlockStore, DiskStore
from ..parallel import Collective, gather_rows
from ..plan import (
    Plan,
    PruneResult,
    Record,
    RunInputs,
    Timer,
    build_report,
    note_mask,
    prune_stage,
    resolve_budgets,
    solve_cost,
)
from ..reconstruction.block import DynamicMasks, refit_block_
from ..status import set_stage
from ..targets import block_list_prefix, find_targets
from .blocks import (
    call_stages,
    capture_with_store,
    dense_outputs,
    hidden_states_of,
    run_block,
    run_block_backward,
    run_block_until,
    split_by_block,
    with_hidden,
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


def _count_what_layers_read(counters: dict[str, Any], calls: Calls) -> None:
    """With no calibration pass (nothing read the whole model): batches and tokens the layers read
    (every rank holds every micro-batch's calls)."""
    tokens = sum(int(hidden_states_of(a, k).shape[:-1].numel()) for a, k in calls)
    counters.update({"batches": len(calls), "tokens": tokens})


def _every_batch(batches: list[Any], plan: Plan) -> list[Any]:
    """Every rank's micro-batches, on every rank, in the order one process runs them (the job deals
    whole groups of `grad_accum` micro-batches round-robin, `calibration.data.round_robin_chunks`).

    Each rank then runs every block on every micro-batch in that order and sums the statistics of the
    tensors it solves itself, exactly as one process does: summing each rank's partial sums instead
    rounds differently, and SparseGPT turns a last-bit difference of a Hessian into a different mask."""
    coll = plan.collective
    if coll.processes == 1:
        return batches
    mine = tree_map(lambda x: x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x, batches)
    return merge_round_robin_chunks(coll.gather_objects(mine), plan.cfg.grad_accum)


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
    dense_hidden: list[torch.Tensor] | None = None  # block_target dense: the dense model's hidden states

    def prune_layer_(self, layer: nn.Module, targets: dict[str, nn.Module], calls: Calls) -> None:
        """Prune `layer`'s targets (in stages with `true_sequential`), refit the block (`block_steps`);
        with `sequential` its outputs, from the pruned layer, replace the recorded hidden states."""
        sequential = self.plan.cfg.sequential_inputs
        refit = self.plan.cfg.block_steps > 0 and bool(targets)
        moving = refit and self.plan.cfg.block_mask == "dynamic"  # the dense targets, before pruning
        dense_weights = {id(t.param): t.param.detach().clone() for t in targets.values()} if moving else None
        if refit or self.dense_hidden is not None:  # the dense block's outputs, before any weight changes
            inputs = list(calls)
            with self.timer("block_refit"):
                dense = self._dense_targets(layer, inputs)
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
                self.block_refits.append(self._refit_(layer, targets, inputs, dense, dense_weights))
            if moving:  # the masks moved: every rank writes down where they ended
                for t in targets.values():
                    w = self.weights[t.key]
                    note_mask(self.record, t.key, w == 0, w, self.plan.cfg.nm, self.record.per_tensor[t.key])
        if sequential or not targets:
            with self.timer("layer_forward"):
                self._outputs(layer, calls, replace=True)

    def _dense_targets(self, layer: nn.Module, inputs: Calls) -> list[torch.Tensor]:
        """What the refit reproduces: the dense block's outputs on the calls' inputs (`block_target`
        pruned), or on the dense model's own hidden states, which they then replace (dense)."""
        if self.dense_hidden is None:
            return self._outputs(layer, inputs)
        dense = self._outputs(
            layer, [with_hidden(*c, h) for c, h in zip(inputs, self.dense_hidden, strict=True)]
        )
        self.dense_hidden = dense
        return dense

    def _outputs(self, layer: nn.Module, calls: Calls, replace: bool = False) -> list[torch.Tensor] | None:
        """The block's outputs on every call, kept where the calls' hidden states are; `replace`: they
        replace the calls' hidden states one by one instead. With several processes each rank computes
        the micro-batches dealt to it and broadcasts them: a micro-batch's output does not depend on
        which rank computes it, so this is one process's result."""
        coll = self.plan.collective
        if coll.processes == 1:
            return run_block(layer, calls, self.device, keep_outputs=True) if replace else dense_outputs(
                layer, calls, self.device)  # fmt: skip
        done = {j: dense_outputs(layer, [calls[j]], self.device)[0]
                for j in range(coll.rank, len(calls), coll.processes)}  # fmt: skip
        out = []
        for j, call in enumerate(calls):
            h = hidden_states_of(*call)
            buf = done.pop(j).to(self.device) if j in done else torch.empty_like(h, device=self.device)
            coll.share_({"h": buf}, {"h": j % coll.processes})
            if replace:
                calls[j] = with_hidden(*call, buf.to(h.device))
            else:
                out.append(buf.to(h.device))
        return None if replace else out

    def _refit_(self, layer: nn.Module, targets: dict, inputs: Calls, dense: list[torch.Tensor],
                dense_weights: dict[int, torch.Tensor] | None) -> dict:  # fmt: skip
        """Every rank runs the refit on every micro-batch in one process's order (gradients summed
        across ranks would round differently): the replicas take one process's steps. `dense_weights`
        (by parameter id, before pruning): the masks move (block_mask dynamic)."""
        cfg = self.plan.cfg
        params = list({id(t.param): t.param for t in targets.values()}.values())
        dynamic = None
        if dense_weights is not None:
            dense_w = [dense_weights[id(p)] for p in params]
            dynamic = DynamicMasks(params, dense_w, list(targets.values()), cfg.nm)
        return refit_block_(
            layer, params, inputs, dense, steps=cfg.block_steps, lr=cfg.block_lr, loss=cfg.block_loss,
            batch=cfg.block_batch, dynamic=dynamic,
            move=lambda c: (to_device(c[0], self.device), to_device(c[1], self.device)),
        )  # fmt: skip

    def _prune_stage_(self, modules: dict[str, nn.Module], layer: nn.Module, calls: Calls,
                      until: nn.Module | None, keep_outputs: bool) -> None:  # fmt: skip
        """Gather the statistics of the group's tensors this rank solves from every recorded input (up
        to `until`, or the whole layer), prune them, and share the results with the other ranks."""
        plan, coll = self.plan, self.plan.collective
        names = [m.key for m in modules.values()]
        owners = coll.owners({n: _solve_cost(plan, self.weights[n]) for n in names})
        mine = {k: m for k, m in modules.items() if owners[m.key] == coll.rank}
        stats = make_statistics(plan.stage_stats, mine)
        with self.timer("layer_statistics"):
            for source, objective in BLOCK_OBJECTIVES.items():
                acc = stats.by_source.get(source)
                if acc is not None and mine:  # its own pass, with autograd, on the stage's current block
                    acc.attach()
                    try:
                        run_block_backward(layer, calls, self.device, objective)
                    finally:
                        acc.detach()
            forward = [acc for source, acc in stats.by_source.items() if source not in BLOCK_OBJECTIVES]
            if mine or keep_outputs:  # a rank that solves none of the group has nothing to gather
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
        with self.timer("prune"):
            prune_stage(plan, [m.key for m in mine.values()], self.weights, self.budgets, self.scope,
                        self.record, stage=stats, whole=self.whole)  # fmt: skip
            if "hessian" in stats.by_source:
                stats.by_source["hessian"].free()
        if coll.processes > 1:
            with self.timer("share"):
                _share_results(coll, names, owners, self.weights, self.record)


class _BlockRows(Statistics):
    """Whole-model statistics taken on row shards (FSDP2), for a layer-wise pass in which every rank holds
    whole blocks: before a block's turn, `gather_` puts the rows of every rank together for that
    block's tensors only, so at most one block's statistics are ever whole."""

    def __init__(self, shards: Statistics, sharding: str | None):
        super().__init__(shards.by_source, shards.needs)
        self.counters, self.shards, self.sharding = shards.counters, shards, sharding
        self.block: dict[tuple[str, str], torch.Tensor] = {}

    def gather_(self, names: list[str]) -> None:
        """Every rank must call it for the same block: each gather is a collective."""
        self.block = {}
        for stat in sorted(self.needs):
            if STATISTICS.get(stat).source == "grad" and self.has(stat):  # the sums held by rows
                for name in names:
                    self.block[(stat, name)] = gather_rows(self.shards.mean(stat, name))

    def mean(self, stat: str, pname: str) -> torch.Tensor:
        if STATISTICS.get(stat).source != "grad":  # per input channel: every rank holds all of it
            return self.shards.mean(stat, pname)
        return self.block[(stat, pname)]


def _leave_the_shards(
    sharded: nn.Module, plan: Plan, whole: Statistics, store: DiskStore
) -> tuple[nn.Module, Plan, _BlockRows]:
    """After the whole-model statistics and the budgets were taken on row shards: the model's skeleton,
    whose blocks the store reads whole from the files, the plan over its targets with the replicated
    collective (each group's tensors dealt to the ranks), and the statistics gathered block by block.
    The sharded model's rows are let go (their storage emptied): nothing reads them again."""
    for p in sharded.parameters():
        plan.collective.local(p).untyped_storage().resize_(0)
    model = store.unsharded()
    targets = find_targets(model, plan.cfg.include, plan.cfg.exclude)
    if set(targets) != set(plan.targets):
        raise ConfigError("the model built from its files has other target matrices than the sharded one")
    sharding = plan.collective.sharding
    plan = dataclasses.replace(plan, collective=Collective(), targets=targets)
    return model, plan, _BlockRows(whole, sharding)


def _solve_cost(plan: Plan, weight: torch.Tensor) -> float:
    """A tensor's share of a group's work, for dealing the group to the ranks (largest first)."""
    cols = weight.shape[-1]
    return solve_cost(plan, weight.numel() // max(cols, 1), cols)


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
    if coll.rows_sharded and not isinstance(store, DiskStore):
        raise ConfigError(
            "layer-wise mode on FSDP2 row shards reads each block whole from the model's files after the "
            "whole-model statistics: pass --offload disk"
        )
    device = (store.device if store is not None else accelerator.device if accelerator is not None
              else next(model.parameters()).device)  # fmt: skip
    store = store or BlockStore(device)
    weights = {t.key: coll.local(t.weight, t.key) for t in plan.targets.values()}
    for p in model.parameters():
        p.requires_grad_(False)

    timer = Timer()
    whole, counters = statistics_of(plan, model, dataclasses.replace(inputs, batches=batches))
    timer.timings["calibration"] = counters["seconds"]
    with timer("budgets"):
        budgets, scope, allocation = resolve_budgets(plan, weights, whole)
    # every micro-batch on every rank, in one process's order (row shards: every rank has them all)
    batches = batches if coll.rows_sharded else _every_batch(batches, plan)
    if coll.rows_sharded:
        model, plan, whole = _leave_the_shards(model, plan, whole, store)
        coll = plan.collective
    prefix, layers = _decoder_layers(model)
    per_layer = split_by_block(plan.targets, prefix, len(layers))
    weights = {t.key: t.weight.data for t in plan.targets.values()}
    store.release_all(model, prefix)  # the whole model was needed up to here; now one block at a time

    was_training = model.training
    model.eval()
    with timer("capture_inputs"):
        host = torch.device("cpu") if cfg.offload_inputs else None
        calls = capture_with_store(model, prefix, layers, batches, loss_fn, device, store, host)
    if not counters["batches"]:
        _count_what_layers_read(counters, calls)
    pruning = _LayerPruning(
        plan, weights, budgets, scope, whole, Record(keep_masks=return_masks), timer, device
    )
    if cfg.block_steps and cfg.block_target == "dense" and cfg.sequential_inputs:
        # (with sequential false the recorded hidden states are the dense model's already)
        pruning.dense_hidden = [hidden_states_of(*c).clone() for c in calls]
    main = (accelerator is None or accelerator.is_local_main_process) and coll.rank == 0
    try:
        for index, layer in enumerate(tqdm(layers, desc="layer-wise pruning", unit="block",
                                           disable=not (cfg.progress and main))):  # fmt: skip
            set_stage(f"layer-wise pruning, block {index + 1} of {len(layers)}")
            with timer("offload_fetch"):
                store.fetch(index, layer)
            weights.update({t.key: t.weight.data for t in per_layer[index].values()})
            calls.use_block(index)  # this block's own mask and rotary embeddings, the current hidden states
            if isinstance(whole, _BlockRows):
                whole.gather_([t.key for t in per_layer[index].values()])
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
                               "batch": cfg.block_batch,
                               "target": cfg.block_target, "mask": cfg.block_mask,
                               "per_block": pruning.block_refits}  # fmt: skip
    report = build_report(plan, record, counters, whole, timer.timings, device=device, allocation=allocation,
                          mode=mode)  # fmt: skip
    if isinstance(whole, _BlockRows):
        report["calibration"]["sharding"] = whole.sharding  # the whole-model statistics' row shards
    return PruneResult(masks=record.masks if return_masks else None, report=report)
