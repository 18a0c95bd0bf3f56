"""What a pruning run does, decided once, and the one step every executor repeats.

`make_plan` turns a config and a model into a `Plan`: the targets, the criterion and its parameters,
the statistics gathered over the whole model (gradients, per-token Fisher, the dense activations an
allocation reads) and those gathered per stage (a block's or stage's activations and Hessians), the
update rule, and which executor runs it. It checks the support table before anything is calibrated.

`resolve_budgets` turns the sparsity into one budget per tensor (uniform, an allocation such as OWL, or
the exact per-tensor counts of the global scope) and refuses a budget that would zero a whole tensor.
`prune_stage` prunes a stage (tensors pruned together): score -> select -> update -> record. The executors differ only
in the groups they hand it (all targets, one block, one stage) and the collective they give it.
`build_report` writes the one report every path returns.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration.stats import STATISTICS, Statistics
from .config import PruneConfig
from .errors import ConfigError
from .expert_calls import probe_experts
from .parallel import Collective
from .reconstruction.obs import sparsegpt_
from .reconstruction.rules import UPDATES, UpdateRule, obs_cost
from .report import calibration_record
from .scoring.allocation import ALLOCATIONS, Allocation, allocate
from .scoring.criteria import CRITERIA, Criterion, sparsegpt_prior
from .selection.masks import empty_tensors, global_sparsities, mask_summary, select_mask
from .support import SupportQuery, check_support
from .targets import (
    Target,
    all_matrices,
    as_targets,
    check_nm_fits,
    check_views_supported,
    find_targets,
    weight_rows,
)

log = logging.getLogger("llm_gradprune")


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor] | None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    cfg: PruneConfig
    criterion: Criterion
    allocation: Allocation
    update: UpdateRule
    executor: str  # "whole_model", "layer_wise" or "sharded"
    collective: Collective
    targets: dict[str, Target]  # target name -> Target (a Linear's weight, a Conv1D's, one expert's)
    shapes: dict[str, tuple[int, int]]  # weight name -> global (rows, row length)
    whole_stats: set[str]  # mean statistics gathered over the whole (dense) model first
    stage_stats: set[str]  # mean statistics gathered per stage (layer-wise: per block or stage)
    notes: list[str] = field(default_factory=list)
    # pruning in rounds: weights pruned by earlier rounds (always pruned again), and an N:M pattern the
    # later rounds must stay able to reach (at most M-N pruned in any group of M)
    already_pruned: dict[str, torch.Tensor] | None = None
    nm_cap: tuple[int, int] | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # target_summary: what is pruned, what is not

    @property
    def names(self) -> list[str]:
        return [t.key for t in self.targets.values()]

    @property
    def numel(self) -> dict[str, int]:
        return {n: r * c for n, (r, c) in self.shapes.items()}

    @property
    def scope(self) -> str:
        """The scope as the report shows it: n:m, adaptive (sparsegpt: an exact share of every OBS column
        chunk, chosen as the weights are updated) or the config's."""
        if self.cfg.nm is not None:
            return "n:m"
        return "adaptive" if self.criterion.adaptive else self.cfg.scope


def split_statistics(cfg: PruneConfig, layer_wise: bool) -> tuple[set[str], set[str]]:
    """(statistics gathered over the whole dense model first, statistics gathered per block or stage)."""
    crit, alloc, update = (
        CRITERIA.get(cfg.criterion),
        ALLOCATIONS.get(cfg.allocation),
        UPDATES.get(cfg.reconstruct),
    )
    reads = set(crit.needs)
    if layer_wise:  # per-block statistics are gathered on the blocks' own inputs
        per_stage = {s for s in reads if STATISTICS.get(s).per_block}
        if update.needs_hessian or crit.adaptive:
            per_stage.add("hessian")
        whole = reads - per_stage
    else:
        per_stage, whole = set(), reads
    whole |= crit.statistics(cfg.criterion_params) - set(crit.needs)  # e.g. sparsegpt's prior: dense model
    whole |= set(alloc.needs)
    return whole, per_stage


def needs_whole_model(cfg: PruneConfig) -> bool:
    """Does a layer-wise run read the whole model before its block-by-block pass (whole-model
    statistics, or the global scope's exact counts over every weight)? With `offload` those are taken
    on the whole model, which is released before the pass streams."""
    return bool(split_statistics(cfg, True)[0]) or (cfg.scope == "global" and cfg.nm is None)


def make_plan(
    model: nn.Module,
    cfg: PruneConfig,
    targets: dict[str, nn.Module] | None = None,
    collective: Collective | None = None,
    resume: bool = False,
) -> Plan:
    """Decide the run: targets, statistics, update rule and executor; refuse what is not supported."""
    collective = collective or Collective()
    run = SupportQuery(
        cfg, processes=collective.processes, sharded=collective.rows_sharded, job={"resume": resume}
    )
    check_support(run)
    crit = CRITERIA.get(cfg.criterion)
    targets = (
        as_targets(model, targets) if targets is not None else find_targets(model, cfg.include, cfg.exclude)
    )
    check_views_supported(targets, collective.rows_sharded)
    probe_experts(model, targets)
    params = {t.key: t.weight for t in targets.values()}
    check_nm_fits(params, cfg.nm)  # before calibration: a bad N:M must not cost a calibration
    shapes = {n: weight_rows(p) for n, p in params.items()}
    alloc, update = ALLOCATIONS.get(cfg.allocation), UPDATES.get(cfg.reconstruct)
    # row shards: the whole-model executor, or the layer-wise one after its whole-model statistics
    executor = "layer_wise" if cfg.layer_wise else ("sharded" if collective.rows_sharded else "whole_model")
    whole, per_stage = split_statistics(cfg, executor == "layer_wise")
    notes = list(cfg.notes)
    for note in notes:
        log.info("note: %s", note)
    warned = []
    if cfg.scope == "global" and crit.reads_activations:
        warned.append(
            f"criterion {crit.name!r} scales its scores with each layer's activations, so they are not "
            "comparable across layers: scope 'global' may prune some layers far more than others"
        )
    if cfg.reconstruct == "none" and crit.adaptive:
        warned.append(f"reconstruct 'none': {crit.name!r}'s mask is kept and its weight updates are dropped")
    for note in warned:
        log.warning("warning: %s", note)
    notes += warned
    return Plan(cfg, crit, alloc, update, executor, collective, targets, shapes, whole, per_stage, notes,
                summary=target_summary(model, targets))  # fmt: skip


def target_summary(model: nn.Module, targets: dict[str, Target]) -> dict[str, Any]:
    """What is pruned and what is not: matrices and weights per kind, routers and embeddings untouched."""
    per_kind: dict[str, dict[str, int]] = {}
    for t in targets.values():
        k = per_kind.setdefault(t.kind, {"matrices": 0, "weights": 0})
        k["matrices"] += 1
        k["weights"] += t.weight.numel()
    candidates, routers = all_matrices(model)
    untargeted = [t for t in candidates if t.name not in targets]
    experts = sorted({t.name.rsplit(".", 1)[0] for t in targets.values() if t.expert is not None})
    return {
        "per_kind": per_kind,
        "routers": routers,
        "untargeted_matrices": len(untargeted),
        "untargeted_weights": sum(t.weight.numel() for t in untargeted),
        "experts": len(experts),
        "note": "routers, embeddings, norms and the head are never pruned",
    }


# -- scores and budgets ------------------------------------------------------------------------------
def make_score_fn(plan: Plan, weights: dict[str, torch.Tensor], *sources: Statistics) -> Callable:
    """score_fn(weight name) -> the criterion's scores, reading each statistic from the first source
    that holds it (a stage's own statistics before the whole model's)."""
    crit, kw = plan.criterion, plan.cfg.criterion_params

    def score_fn(pname: str) -> torch.Tensor:
        stats = {s: next(src for src in sources if src.has(s)).mean(s, pname) for s in crit.needs}
        scores = crit.score(weights[pname], stats, **kw)
        if plan.nm_cap is not None:
            scores = cap_groups(scores, *plan.nm_cap)
        if plan.already_pruned is not None:
            scores = scores.masked_fill(plan.already_pruned[pname].to(scores.device), float("-inf"))
        return scores

    return score_fn


def cap_groups(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Scores with the N highest of every M consecutive input weights of a row made unprunable (+inf),
    so no selection can prune more than M-N of a group and an N:M pattern stays reachable."""
    s2 = scores.reshape(scores.shape[0], -1)
    groups = s2.reshape(s2.shape[0], -1, m)
    keep = torch.topk(groups, n, dim=-1).indices
    capped = groups.scatter(-1, keep, float("inf"))
    return capped.reshape(scores.shape)


def resolve_budgets(
    plan: Plan, weights: dict[str, torch.Tensor], stats: Statistics
) -> tuple[dict[str, float], str, dict[str, Any] | None]:
    """(sparsity per tensor, the scope each tensor selects in, per-layer allocation summary or None).

    The global scope becomes the exact per-tensor counts of the global selection over the dense scores,
    so every tensor then selects on its own (`tensor` scope) and every path sees all counts before any
    weight changes. A budget that would zero a whole tensor is refused unless allow_empty_tensors.
    """
    cfg, coll = plan.cfg, plan.collective
    names, scope = plan.names, plan.cfg.scope
    budgets: dict[str, float] = dict.fromkeys(names, cfg.sparsity)
    summary = None
    if plan.allocation.needs:
        act = (lambda n: stats.mean("act_sq_mean", n)) if stats.has("act_sq_mean") else None
        # sparsegpt (no scope) takes a share of each tensor, rounded per column block: counted as whole weights
        alloc, summary = allocate(
            plan.allocation.name, cfg.allocation_params, weights, act, plan.shapes, cfg.sparsity, scope or "tensor",
            reduce=coll.sum_scalars if coll.rows_sharded else None,
        )  # fmt: skip
        budgets = dict(alloc)
    if cfg.nm is None and scope == "global":
        # an expert no token was routed to has no score comparable with the others: it keeps the
        # target sparsity, and the global ranking runs over the rest
        unrouted = set(stats.unrouted())
        score_fn = make_score_fn(plan, weights, stats)
        ranked = [n for n in names if n not in unrouted]
        budgets = global_sparsities(ranked, score_fn, sparsity=cfg.sparsity, numel=plan.numel,
                                    chunk_elems=cfg.select_chunk_elems, scores_dir=cfg.scores_dir,
                                    collective=coll)  # fmt: skip
        budgets = {n: budgets.get(n, cfg.sparsity) for n in names}
        scope = "tensor"
    empty = empty_tensors(budgets, plan.shapes, scope, cfg.nm)
    if empty and not cfg.allow_empty_tensors:
        listed = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise ConfigError(
            f"this selection would zero every weight of {len(empty)} target tensor(s) ({listed}); nothing was "
            "written: use another scope or sparsity, or pass --allow-empty-tensors to accept it"
        )
    if empty:
        plan.notes.append(
            f"{len(empty)} target tensor(s) are entirely zero (allow_empty_tensors): {', '.join(empty)}"
        )
        log.warning("warning: %s", plan.notes[-1])
    return budgets, scope, summary


# -- the one pruning step --------------------------------------------------------------------------
@dataclass
class Record:
    """What prune_stage writes down per tensor (local counts; the report sums them across row shards)."""

    per_tensor: dict[str, dict[str, Any]] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_bytes: dict[str, int] = field(default_factory=dict)
    routed_tokens: dict[str, int] = field(default_factory=dict)  # expert matrices: tokens routed to them
    keep_masks: bool = True


INFO_KEYS = ("damp", "dead_inputs", "obs_loss")


def note_mask(record: Record, name: str, mask: torch.Tensor, weight: torch.Tensor, nm: tuple[int, int] | None,
              info: dict[str, Any]) -> None:  # fmt: skip
    """Write down a tensor's mask (True: pruned), its counts and zeros, and the update's INFO_KEYS."""
    summary = mask_summary(mask, nm) if mask.numel() else {"numel": 0, "masked": 0}
    record.per_tensor[name] = {
        **summary,
        "zeros": int((weight == 0).sum()),
        **{k: v for k, v in info.items() if k in INFO_KEYS},
    }
    if record.keep_masks:
        record.masks[name] = mask.cpu()


@torch.no_grad()
def prune_tensor(
    plan: Plan,
    name: str,
    weight: torch.Tensor,
    budget: float,
    scope: str,
    score_fn: Callable[[str], torch.Tensor] | None,
    hessian: torch.Tensor | None = None,
    whole: Statistics | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Select this tensor's mask and update its weights in place: (mask, info for the report)."""
    cfg = plan.cfg
    if plan.criterion.adaptive:  # the mask is chosen inside the OBS pass, on a copy where not kept
        prior = None
        if cfg.criterion_params["grad_exp"]:
            means = {
                s: whole.mean(s, name) for s in plan.criterion.statistics(cfg.criterion_params) - {"hessian"}
            }
            prior = sparsegpt_prior(means, cfg.criterion_params["prior"], cfg.criterion_params["grad_exp"])
            prior = prior.to(weight.device)
        dense = None if plan.update.name == "obs" else weight.clone()
        mask, info = sparsegpt_(weight, hessian, sparsity=budget, nm=cfg.nm, blocksize=cfg.blocksize,
                                percdamp=cfg.percdamp, prior=prior)  # fmt: skip
        if dense is None:
            return mask, info
        weight.copy_(dense)  # the rule starts again from the dense weights, with SparseGPT's mask
        del dense
        return mask, {**info, **plan.update.apply(weight, hessian, mask, cfg.blocksize, cfg.percdamp)}
    mask = select_mask(score_fn(name), scope=scope, sparsity=budget, nm=cfg.nm, chunk_elems=cfg.select_chunk_elems,
                       numel=plan.numel[name], collective=plan.collective)  # fmt: skip
    mask = mask.view(weight.shape).to(weight.device)
    return mask, plan.update.apply(weight, hessian, mask, cfg.blocksize, cfg.percdamp)


def solve_cost(plan: Plan, rows: int, cols: int) -> float:
    """Relative time of `prune_tensor` on one [rows, cols] target (units: `reconstruction.rules`): the
    adaptive criterion's OBS pass, or a selection (about 1/8 of an OBS weight: 0.18 s for 4096 x 1024,
    one CPU thread), then the update rule."""
    if plan.criterion.adaptive:
        return obs_cost(rows, cols) + (0.0 if plan.update.name == "obs" else plan.update.cost(rows, cols))
    return rows * cols / 8 + plan.update.cost(rows, cols)


def prune_stage(
    plan: Plan,
    names: list[str],
    weights: dict[str, torch.Tensor],
    budgets: dict[str, float],
    scope: str,
    record: Record,
    *,
    stage: Statistics | None = None,
    whole: Statistics | None = None,
    progress: Callable[[], None] | None = None,
) -> None:
    """score -> select -> update -> record, for each tensor of one stage (all targets, a block, a stage)."""
    sources = [s for s in (stage, whole) if s is not None]
    score_fn = None if plan.criterion.adaptive else make_score_fn(plan, weights, *sources)
    routed = next((s.by_source["routed"] for s in sources if "routed" in s.by_source), None)
    for name in names:
        if routed is not None and name in routed.tokens:
            record.routed_tokens[name] = routed.tokens[name]
        hessian = stage.mean("hessian", name) if stage is not None and stage.has("hessian") else None
        mask, info = prune_tensor(plan, name, weights[name], budgets[name], scope, score_fn, hessian, whole)
        if hessian is not None:
            record.hessian_bytes[name] = stage.by_source["hessian"].nbytes(name.removesuffix(".weight"))
        note_mask(record, name, mask, weights[name], plan.cfg.nm, info)
        if progress is not None:
            progress()


# -- the one report ------------------------------------------------------------------------------
TIMING_KEYS = (
    "calibration",
    "budgets",
    "capture_inputs",
    "layer_statistics",
    "prune",
    "layer_forward",
    "block_refit",
    "share",
    "offload_fetch",
    "offload_release",
    "total",
)


def peak_memory_bytes(device: torch.device | None = None) -> dict[str, int]:
    out = {"cpu_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device is not None and device.type == "cuda":
        out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _global_counts(plan: Plan, per_tensor: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sum row shards' counts into whole-tensor counts (one collective); as they are otherwise."""
    if not plan.collective.rows_sharded:
        return per_tensor
    rows = [
        [t["numel"], t["masked"], t["zeros"], 1 - t.get("nm_groups_valid", 1)] for t in per_tensor.values()
    ]
    flat = plan.collective.sum_scalars([float(v) for r in rows for v in r])
    out = {}
    for i, name in enumerate(per_tensor):
        numel, masked, zeros, invalid = (int(v) for v in flat[4 * i : 4 * i + 4])
        out[name] = {"numel": numel, "masked": masked}
        if plan.cfg.nm is not None:
            out[name]["nm_groups_valid"] = int(invalid == 0)
        out[name]["zeros"] = zeros
    return out


def build_report(
    plan: Plan,
    record: Record,
    counters: dict[str, Any],
    stats: Statistics,
    timings: dict[str, float],
    *,
    allocation: dict[str, Any] | None = None,
    mode: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The report of every path: the same keys whatever executor and collective ran."""
    cfg = plan.cfg
    per_tensor = _global_counts(plan, record.per_tensor)
    numel = sum(t["numel"] for t in per_tensor.values())
    zeros = sum(t["zeros"] for t in per_tensor.values())
    grad = stats.grad
    hb = record.hessian_bytes
    return {
        "criterion": cfg.criterion,
        "criterion_params": dict(cfg.criterion_params),
        "scope": plan.scope,
        "pattern": cfg.pattern,
        "target_sparsity": cfg.sparsity,
        "allocation_method": cfg.allocation,
        "allocation_params": dict(cfg.allocation_params),
        "allocation": allocation,
        "targets": len(per_tensor),
        "target_weights": numel,
        "masked_weights": sum(t["masked"] for t in per_tensor.values()),
        "zero_weights": zeros,
        "overall_sparsity": zeros / numel if numel else 0.0,
        "empty_tensors": [n for n, t in per_tensor.items() if t["numel"] and t["zeros"] == t["numel"]],
        "notes": list(plan.notes),
        "rounds": None,  # pruning in rounds fills it (rounds)
        "calibration": calibration_record(
            batches=counters["batches"],
            tokens=counters["tokens"],
            grad_accum=cfg.grad_accum,
            gradients=counters.get("samples", 0) if stats.needs_backward else 0,
            stats_device=cfg.stats_device,
            gradient_checkpointing=cfg.gradient_checkpointing,
            recomputed_layers=counters.get("recomputed_layers", 0),
            mean_loss=counters["mean_loss"],
            statistics=sorted({STATISTICS.get(s).accumulator for s in plan.whole_stats | plan.stage_stats}),
            # per tensor, only those that skipped a non-finite gradient batch
            skipped_nonfinite={n: c for n, c in (grad.skipped if grad else {}).items() if c},
            processes=plan.collective.processes,
            sharding=plan.collective.sharding,
            reduce=counters.get("reduce"),
            resumed_from_batch=counters.get("resumed_from_batch"),
            state_saves=counters.get("state_saves", 0),
            threads=torch.get_num_threads(),  # results are bitwise repeatable at a fixed thread count
        ),
        "mode": {
            "executor": plan.executor,
            "layer_wise": plan.executor == "layer_wise",
            "mask": "adaptive" if plan.criterion.adaptive else "criterion",
            "reconstruct": cfg.reconstruct,
            "sequential": cfg.sequential_inputs and plan.executor == "layer_wise",
            "true_sequential": cfg.true_sequential,
            "blocksize": cfg.blocksize,
            "percdamp": cfg.percdamp,
            "offload_inputs": cfg.offload_inputs,
            "stages_per_block": None,
            "scores_on_disk": cfg.scores_dir is not None,
            **(mode or {}),
        },
        "hessian_bytes": {
            "per_tensor": hb,
            "max_per_layer": max(hb.values(), default=0),
            "note": "fp32 in_features^2 x 4; q/k/v and gate/up share one",
        },
        "peak_memory_bytes": peak_memory_bytes(device),
        "matrices": plan.summary or None,
        "experts": _experts_record(plan, record),
        "timings_s": {k: float(timings.get(k, 0.0)) for k in TIMING_KEYS},
        "per_tensor": per_tensor,
    }


def _experts_record(plan: Plan, record: Record) -> dict[str, Any] | None:
    """Routed calibration tokens per expert (its first matrix's count), and the experts that got none."""
    routed = record.routed_tokens
    if not routed:
        return None
    counts: dict[str, int] = {}
    for name, tokens in routed.items():
        counts.setdefault(name.rsplit(".", 1)[0], tokens)
    return {
        "routed_tokens": counts,
        "unrouted": sorted(e for e, c in counts.items() if c == 0),
        "rule": "an expert with no routed token reads neutral statistics: pruned by magnitude, no update",
    }


@dataclass
class RunInputs:
    """What `prune_` hands an executor besides the model and the plan: the text, how it is turned into a
    loss, and the optional saved or given statistics. The executors share it (and so one signature)."""

    batches: Any = None  # an iterable of micro-batches (None: no calibration)
    loss_fn: Any = None  # (model, batch) -> loss; None means calibration.loop.causal_lm_loss
    accelerator: Any = None
    return_masks: bool = True
    num_batches: int | None = None
    calib_state: Any = None  # io.calib_state.CalibState: saves and resumes the calibration pass
    statistics: Any = None  # calibration.stats.Statistics filled before (a sweep calibrates once)
    offload: Any = None  # offload.BlockStore: where a layer-wise run keeps the blocks between turns


class Timer:
    """Adds the seconds of each `with timer("key"):` block to `timings[key]`."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, key: str):
        return _Span(self.timings, key)


class _Span:
    def __init__(self, timings: dict[str, float], key: str):
        self.timings, self.key = timings, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.start
