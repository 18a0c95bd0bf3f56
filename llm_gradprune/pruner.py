"""Library API: a model, batches and a config in; the model pruned in place, masks and a report out.

    from llm_gradprune import PruneConfig, prune_
    result = prune_(model, batches, PruneConfig(criterion="fisher", sparsity=0.5))

Works for any `nn.Module`: pass `loss_fn(model, batch)` for models that are not causal LMs and
`targets` (or include/exclude patterns in the config) to choose the layers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import criteria
from .allocation import owl_sparsities
from .calibrate import LossFn, calibrate, causal_lm_loss, reduce_stats_
from .config import PruneConfig
from .masks import apply_mask_, iter_masks, mask_summary
from .stats import ActStats, GradStats, TokenGradStats
from .targets import check_nm_fits, find_targets, weight_rows


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor] | None
    report: dict[str, Any] = field(default_factory=dict)


def reduce_token_stats_(tok_stats: TokenGradStats | None, accelerator) -> None:
    """Sum per-token Fisher sums and token counts across processes (no-op with one process)."""
    if tok_stats is None or accelerator is None or accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for t in tok_stats.sums.values():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    names = list(tok_stats.tokens)
    packed = torch.tensor(
        [tok_stats.tokens[n] for n in names], dtype=torch.float64, device=accelerator.device
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    tok_stats.tokens = {n: int(v) for n, v in zip(names, packed.tolist(), strict=True)}


def criterion_params(cfg: PruneConfig) -> dict[str, float]:
    """Keyword parameters of the configured criterion function."""
    if cfg.criterion == "gblm":
        return {"alpha": cfg.gblm_alpha}
    if cfg.criterion == "blend":
        b = cfg.blend
        return {"weight_exp": b["weight"], "act_exp": b["act"], "grad_exp": b["grad"]}
    return {}


def make_score_fn(
    crit: criteria.Criterion,
    kw: dict[str, float],
    weights: dict[str, torch.Tensor],
    grad_stats: GradStats | None = None,
    act_stats: ActStats | None = None,
    tok_stats: TokenGradStats | None = None,
):
    """score_fn(parameter name) -> scores of that weight from the means of the filled statistics."""

    def score_fn(pname: str) -> torch.Tensor:
        module = pname.removesuffix(".weight")
        stats: dict[str, torch.Tensor] = {}
        for need in crit.needs:
            if need == "act_sq_mean":
                stats[need] = act_stats.mean_sq(module)
            elif need == "token_grad_sq_mean":
                stats[need] = tok_stats.mean(module)
            else:
                stats[need] = grad_stats.mean(criteria.MEAN_OF[need], pname)
        return crit.score(weights[pname], stats, **kw)

    return score_fn


@dataclass
class Statistics:
    """The filled calibration statistics of one whole-model pass (None where not asked for)."""

    grad: GradStats | None
    act: ActStats | None
    token: TokenGradStats | None
    counters: dict[str, Any]


GRAD_SUMS = frozenset({"grad_sum", "grad_abs_sum", "grad_sq_sum"})


def gather_statistics(
    model: nn.Module,
    batches: Iterable[Any] | None,
    cfg: PruneConfig,
    targets: dict[str, nn.Module],
    accumulators: set[str],
    *,
    loss_fn: LossFn = causal_lm_loss,
    accelerator=None,
    num_batches: int | None = None,
    checkpointer=None,
) -> Statistics:
    """Allocate exactly the sums in `accumulators`, fill them in one calibration pass, reduce them
    across processes. No pass at all when nothing is asked for. Shared by `prune_` and layer-wise mode."""
    params = {f"{name}.weight": module.weight for name, module in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    stats_device = "cpu" if cfg.stats_device == "cpu" else None
    grad_needs = set(accumulators) & GRAD_SUMS
    grad_stats = GradStats(params, grad_needs, device=stats_device) if grad_needs else None
    tok_stats = TokenGradStats(targets, device=stats_device) if "token_grad_sq_sum" in accumulators else None
    if tok_stats is not None and len(tok_stats.modules) < len(targets):
        other = next(n for n in targets if n not in tok_stats.modules)
        raise ValueError(
            f"criterion {cfg.criterion!r} reads Linear layers only; {other!r} is not one (use fisher)"
        )
    if tok_stats is not None and grad_stats is None:
        grad_stats = GradStats(params, ())  # no sums: only makes calibrate run the backward pass
    act_stats = ActStats(targets) if "act_sq_sum" in accumulators else None
    counters = {"batches": 0, "tokens": 0, "mean_loss": float("nan"), "seconds": 0.0}
    if not accumulators:
        return Statistics(grad_stats, act_stats, tok_stats, counters)
    if batches is None:
        raise ValueError(f"criterion {cfg.criterion!r} needs calibration batches")
    if tok_stats is not None:
        tok_stats.attach()
        if checkpointer is not None:  # per-token sums are part of a resumable state too
            checkpointer.token_stats = tok_stats
    try:
        counters = calibrate(
            model, batches, grad_stats, act_stats, accelerator=accelerator, loss_fn=loss_fn,
            progress=cfg.progress, total=num_batches, grad_accum=cfg.grad_accum,
            checkpointing=cfg.gradient_checkpointing, checkpointer=checkpointer,
        )  # fmt: skip
    finally:
        if tok_stats is not None:
            tok_stats.detach()
    reduce_stats_(grad_stats, act_stats, counters, accelerator, chunk_elems=cfg.select_chunk_elems)
    reduce_token_stats_(tok_stats, accelerator)
    if counters["batches"] == 0:
        raise ValueError(f"criterion {cfg.criterion!r} needs calibration data but no batch was given")
    return Statistics(grad_stats, act_stats, tok_stats, counters)


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
    checkpointer=None,
) -> PruneResult:
    """Calibrate (if the criterion needs it), score, select and zero the target weights in place."""
    cfg = cfg or PruneConfig()
    if cfg.layer_wise:  # sparsegpt, OBS reconstruction or sequential statistics: block by block
        from .sequential import prune_layer_wise_

        return prune_layer_wise_(model, batches, cfg, loss_fn=loss_fn, targets=targets, accelerator=accelerator,
                                 return_masks=return_masks, num_batches=num_batches)  # fmt: skip
    crit = criteria.get(cfg.criterion)
    targets = targets if targets is not None else find_targets(model, cfg.include, cfg.exclude)
    params = {f"{name}.weight": module.weight for name, module in targets.items()}
    check_nm_fits(params, cfg.nm)  # before calibration: a bad N:M must not cost a calibration
    report: dict[str, Any] = {"timings_s": {}}

    owl = getattr(cfg, "allocation", "uniform") == "owl"
    stats = gather_statistics(
        model, batches, cfg, targets, crit.accumulators | ({"act_sq_sum"} if owl else set()),
        loss_fn=loss_fn, accelerator=accelerator, num_batches=num_batches, checkpointer=checkpointer,
    )  # fmt: skip
    grad_stats, act_stats, tok_stats, counters = stats.grad, stats.act, stats.token, stats.counters
    report["timings_s"]["calibration"] = counters["seconds"]

    kw = criterion_params(cfg)
    score_fn = make_score_fn(crit, kw, params, grad_stats, act_stats, tok_stats)

    start = time.perf_counter()
    names = list(params)
    sparsity: float | dict[str, float] = cfg.sparsity
    if owl:  # OWL reads Wanda scores whatever the criterion (Yin et al., 2024)
        sparsity, report["allocation"] = owl_sparsities(
            lambda n: criteria.wanda(params[n].detach().float(), act_stats.mean_sq(n.removesuffix(".weight"))),
            {n: weight_rows(p) for n, p in params.items()}, cfg.sparsity, cfg.scope,
            m=cfg.owl_m, lam=cfg.owl_lambda,
        )  # fmt: skip
    masks: dict[str, torch.Tensor] = {}
    per_tensor: dict[str, dict[str, int]] = {}
    with torch.no_grad():
        stream = iter_masks(
            names, score_fn, scope=cfg.scope, sparsity=sparsity, nm=cfg.nm,
            chunk_elems=cfg.select_chunk_elems, shapes={n: p.shape for n, p in params.items()},
            scores_dir=cfg.scores_dir,
        )  # fmt: skip
        main = accelerator is None or accelerator.is_local_main_process
        for name, mask in tqdm(stream, total=len(names), desc="select+mask", unit="tensor",
                               disable=not (cfg.progress and main)):  # fmt: skip
            apply_mask_(params[name], mask)
            per_tensor[name] = {**mask_summary(mask, cfg.nm), "zeros": int((params[name] == 0).sum())}
            if return_masks:
                masks[name] = mask.cpu()
    report["timings_s"]["selection"] = time.perf_counter() - start

    numel = sum(t["numel"] for t in per_tensor.values())
    zeros = sum(t["zeros"] for t in per_tensor.values())
    masked = sum(t["masked"] for t in per_tensor.values())
    report.update(
        {
            "criterion": cfg.criterion,
            "criterion_params": kw,
            "scope": cfg.scope if cfg.nm is None else "n:m",
            "pattern": cfg.pattern,
            "target_sparsity": cfg.sparsity,
            "allocation_method": getattr(cfg, "allocation", "uniform"),
            "targets": len(per_tensor),
            "target_weights": numel,
            "masked_weights": masked,
            "zero_weights": zeros,
            "overall_sparsity": zeros / numel if numel else 0.0,
            "calibration": {
                "batches": counters["batches"],
                "tokens": counters["tokens"],
                "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum,
                "gradient_samples": counters.get("samples", counters["batches"]),
                "stats_device": cfg.stats_device,
                "gradient_checkpointing": cfg.gradient_checkpointing,
                "mean_loss": counters["mean_loss"],
                "statistics": sorted(crit.accumulators),
                # per tensor, only those that skipped a non-finite gradient batch
                "skipped_nonfinite": {
                    n: c for n, c in (grad_stats.skipped if grad_stats else {}).items() if c
                },
                "processes": accelerator.num_processes if accelerator is not None else 1,
                # the one cross-process sum of the statistics: calls, elements, seconds
                "reduce": counters.get("reduce"),
            },
            "per_tensor": per_tensor,
        }
    )
    return PruneResult(masks=masks if return_masks else None, report=report)
