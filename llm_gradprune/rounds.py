"""Pruning in rounds: K rounds towards the target sparsity, each recalibrated on the pruned model.

Round r prunes to sparsity s_r of a schedule (cubic, Zhu & Gupta 2017: s (1 - (1 - r/K)^3); or linear
s r/K) with any criterion, scope, pattern or update rule: a fresh calibration pass on the model as the
earlier rounds left it, then `prune_` with the earlier zeros pruned again whatever their new scores, so
masks only grow and the last round lands exactly on the target. Towards an N:M pattern the earlier
rounds are unstructured but never prune more than M-N of a group (`plan.cap_groups`), and the last round
applies the pattern. Between rounds, optionally, `round_steps` of masked recovery training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import PruneConfig
from .executors import prune_
from .parallel import collective_for
from .plan import PruneResult
from .recovery.config import RecoverConfig
from .recovery.trainer import recover_
from .status import set_stage, within
from .targets import as_targets, find_targets


def schedule(target: float, rounds: int, kind: str = "cubic") -> list[float]:
    """Sparsity after each of `rounds` rounds; the last is exactly `target`."""
    if kind == "linear":
        out = [target * r / rounds for r in range(1, rounds + 1)]
    else:
        out = [target * (1.0 - (1.0 - r / rounds) ** 3) for r in range(1, rounds + 1)]
    out[-1] = target
    return out


def round_config(cfg: PruneConfig, sparsity: float, last: bool) -> PruneConfig:
    """The config of one round: the target's settings at this round's sparsity; an N:M target becomes
    unstructured per row before the last round."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    values["rounds"] = 1
    if cfg.nm is not None and not last:
        values.update(pattern="unstructured", scope="row", sparsity=sparsity)
    elif cfg.nm is None:
        values["sparsity"] = sparsity
    if cfg.nm is not None and last:
        values["sparsity"] = None
    return PruneConfig(**values)


def prune_in_rounds_(
    model: nn.Module,
    batches: list[Any],
    cfg: PruneConfig,
    *,
    recover: RecoverConfig | None = None,
    recover_batches: list[torch.Tensor] | None = None,
    accelerator=None,
    targets: dict[str, nn.Module] | None = None,
    on_round: Callable[[int, PruneResult], None] | None = None,
) -> PruneResult:
    """Prune `model` in `cfg.rounds` rounds; the last round's result, with every round in report["rounds"]."""
    targets = (
        as_targets(model, targets) if targets is not None else find_targets(model, cfg.include, cfg.exclude)
    )
    coll = collective_for(model)
    weights = {t.key: t.weight for t in targets.values()}
    levels = schedule(cfg.sparsity, cfg.rounds, cfg.round_schedule)
    pruned: dict[str, torch.Tensor] | None = None
    rounds: list[dict[str, Any]] = []
    result = None
    for r, level in enumerate(levels, start=1):
        # every stage inside (calibration batch, training step) is reported as part of the round
        with within(f"pruning round {r} of {len(levels)}"):
            set_stage("starting the round")
            last = r == len(levels)
            result = prune_(model, batches, round_config(cfg, level, last), targets=targets, accelerator=accelerator,
                            already_pruned=pruned, nm_cap=cfg.nm if not last else None,
                            num_batches=len(batches) if isinstance(batches, list) else None)  # fmt: skip
            pruned = {n: (coll.local(w, n) == 0) for n, w in weights.items()}  # this rank's rows under FSDP2
            entry = {"round": r, "target_sparsity": level, "overall_sparsity": result.report["overall_sparsity"],
                     "calibration_mean_loss": result.report["calibration"]["mean_loss"],
                     "pattern": result.report["pattern"]}  # fmt: skip
            if not last and recover is not None and recover.round_steps and recover_batches:
                model, rec = recover_(model, recover_batches, recover, steps=recover.round_steps, accelerator=accelerator,
                                      targets=targets, progress=recover_batches is not None)  # fmt: skip
                entry["recovery"] = {k: rec[k] for k in ("steps", "tokens", "final_loss", "seconds")}
        rounds.append(entry)
        if on_round is not None:
            on_round(r, result)
    result.report["rounds"] = {"count": len(levels), "schedule": cfg.round_schedule, "per_round": rounds}
    return result
