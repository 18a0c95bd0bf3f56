"""Pruning a model whose parameters are sharded across processes (FSDP2), without gathering them.

FSDP2 (`torch.distributed.fsdp.fully_shard`, or Accelerate with `fsdp_version: 2`) splits every
weight by rows: rank r holds a contiguous block of output rows as the local part of a DTensor.

Calibration. FSDP reduce-scatters gradients, *averaging* them over ranks, so ranks must not work on
different micro-batches (the average of two micro-batch gradients is not a per-micro-batch sample).
Instead every rank takes a piece of the *same* micro-batch: its blocks `tensor_split(batch, world)[r]`
with loss scaled by world * n_r / B. FSDP's average then equals the gradient of the micro-batch's mean
loss, exactly the sample a single process would fold in, and it arrives already sharded: each rank folds
its rows of it into local fp32 sums right after backward. Micro-batch composition does not change with
the process count; a rank whose piece is empty (B < world) runs its first block with loss weight 0 so
the collectives still match, and records no activations for it.

Scores are computed on local rows only; thresholds come from `distributed.iter_sharded_masks` (radix
histograms and tie counts all-reduced, no score gathered); masks are applied to the local rows in
place. `full_state_dict` gathers the pruned weights on the main process for saving.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import criteria
from .calibrate import LossFn, causal_lm_loss, count_tokens, to_device
from .config import ConfigError, PruneConfig
from .distributed import all_reduce_scalars, all_reduce_sum_, iter_sharded_masks, world
from .masks import apply_mask_, mask_summary
from .pruner import PruneResult, criterion_params, make_score_fn
from .stats import ActStats, GradStats
from .targets import block_list_prefix, find_targets


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_rows(p: torch.Tensor, name: str = "parameter") -> torch.Tensor:
    """This rank's rows of a row-sharded DTensor parameter (a view: writes reach the parameter)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p.data
    if tuple(p.placements) != (Shard(0),):
        raise ConfigError(
            f"{name} is sharded as {tuple(p.placements)}: only FSDP2 row sharding (Shard(0)) is supported"
        )
    return p.to_local()


def fully_shard_model(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Shard with torch FSDP2 directly: each decoder layer, then the root (what Accelerate does on GPUs).

    Used where Accelerate does not offer FSDP itself (CPU processes over gloo).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    mesh = init_device_mesh(device.type, (world()[1],))
    model.to(device)
    prefix = block_list_prefix(model)
    if prefix is not None:
        for layer in model.get_submodule(prefix):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def split_piece(batch: Any, rank: int, size: int) -> tuple[Any, int, int]:
    """(this rank's piece, its block count, the micro-batch's block count): contiguous, sizes differ by <= 1."""
    if isinstance(batch, torch.Tensor):
        return torch.tensor_split(batch, size)[rank], len(torch.tensor_split(batch, size)[rank]), len(batch)
    if isinstance(batch, dict):
        n = len(next(iter(batch.values())))
        parts = {k: torch.tensor_split(v, size)[rank] for k, v in batch.items()}
        return parts, len(next(iter(parts.values()))), n
    raise TypeError(f"sharded calibration splits tensors or dicts of tensors, not {type(batch).__name__}")


def _first_block(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    return {k: v[:1] for k, v in batch.items()}


def fold_sharded_grads_(grad_stats: GradStats, params: dict[str, nn.Parameter]) -> None:
    """Fold this rank's rows of every target gradient into the sums and free the gradients.

    A micro-batch is skipped for a tensor when any rank saw a non-finite value in it, so all shards
    of a tensor average over the same micro-batches.
    """
    names = [n for n in params if params[n].grad is not None]
    local = {n: local_rows(params[n].grad) for n in names}
    bad = all_reduce_scalars([float(not bool(torch.isfinite(local[n]).all())) for n in names], "max")
    for n, b in zip(names, bad, strict=True):
        if b:
            grad_stats.skipped[n] += 1
            if grad_stats.skipped[n] == 1:
                warnings.warn(f"non-finite gradient for {n}: batch skipped for this tensor", stacklevel=2)
        else:
            grad_stats.fold(n, local[n])
        params[n].grad = None


def calibrate_sharded(
    model: nn.Module,
    batches: Iterable[Any],
    grad_stats: GradStats | None,
    act_stats: ActStats | None,
    params: dict[str, nn.Parameter],
    *,
    loss_fn: LossFn = causal_lm_loss,
    device: torch.device | str = "cpu",
    accelerator=None,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Any]:
    """Every rank iterates all micro-batches, each on its piece; see the module docstring."""
    rank, size = world()
    was_training = model.training
    model.eval()
    n_batches = n_tokens = 0
    loss_sum = 0.0
    start = time.perf_counter()
    if grad_stats is not None:
        for p in params.values():
            p.requires_grad_(True)
    try:
        for batch in tqdm(batches, total=total, desc="calibration", disable=not (progress and rank == 0)):
            piece, n_r, n_all = split_piece(batch, rank, size)
            weight = n_r / n_all
            if n_r == 0:
                piece = _first_block(batch)  # keeps the collectives in step; contributes nothing
            piece = to_device(piece, device)
            if act_stats is not None and n_r:
                act_stats.attach()
            try:
                if grad_stats is not None:
                    loss = loss_fn(model, piece)
                    scaled = loss * (size * weight)  # FSDP averages over ranks: undo it, weigh by blocks
                    accelerator.backward(scaled) if accelerator is not None else scaled.backward()
                    fold_sharded_grads_(grad_stats, params)
                else:
                    with torch.no_grad():
                        loss = loss_fn(model, piece)
            finally:
                if act_stats is not None:
                    act_stats.detach()
            loss_sum += float(loss.detach()) * weight
            n_tokens += count_tokens(piece) if n_r else 0
            n_batches += 1
    finally:
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)
        model.train(was_training)
    calib_s = time.perf_counter() - start
    reduce = {"calls": 0, "elements": 0, "seconds": 0.0}
    scalars = [float(n_tokens), loss_sum]
    if act_stats is not None:
        reduce = all_reduce_sum_(list(act_stats.sums.values()))
        act_names = list(act_stats.tokens)
        scalars += [float(act_stats.tokens[n]) for n in act_names]
    vals = all_reduce_scalars(scalars)
    if act_stats is not None:
        act_stats.tokens = {n: int(v) for n, v in zip(act_names, vals[2:], strict=True)}
    return {
        "batches": n_batches,
        "tokens": int(vals[0]),
        "mean_loss": vals[1] / max(n_batches, 1),
        "seconds": calib_s,
        "reduce": reduce,
    }


def prune_sharded_(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    cfg: PruneConfig | None = None,
    *,
    loss_fn: LossFn = causal_lm_loss,
    targets: dict[str, nn.Module] | None = None,
    accelerator=None,
    device: torch.device | str | None = None,
    return_masks: bool = True,
    num_batches: int | None = None,
) -> PruneResult:
    """`pruner.prune_` for an FSDP2-sharded model: every rank passes *all* micro-batches.

    Returned masks (if asked) hold this rank's rows only; `report["per_tensor"]` counts are global.
    """
    cfg = cfg or PruneConfig()
    if isinstance(cfg.sparsity, dict):
        raise ConfigError("a per-tensor sparsity allocation is not supported with a sharded model")
    if cfg.grad_accum != 1:
        raise ConfigError(
            f"grad_accum {cfg.grad_accum} is not supported with a sharded (FSDP) model: raise batch_size instead"
        )
    crit = criteria.get(cfg.criterion)
    if "token_grad_sq_sum" in crit.accumulators:
        raise ConfigError(
            f"criterion {cfg.criterion!r} is not supported with a sharded (FSDP) model: "
            "its per-token sums are not collected per shard; use fisher or a replicated model"
        )
    targets = targets if targets is not None else find_targets(model, cfg.include, cfg.exclude)
    params = {f"{name}.weight": module.weight for name, module in targets.items()}
    local = {n: local_rows(p, n) for n, p in params.items()}
    device = device or (accelerator.device if accelerator is not None else next(iter(local.values())).device)
    report: dict[str, Any] = {"timings_s": {}}

    for p in model.parameters():
        p.requires_grad_(False)
    grad_needs = crit.accumulators & {"grad_sum", "grad_abs_sum", "grad_sq_sum"}
    grad_stats = GradStats(local, grad_needs) if grad_needs else None  # local shapes: fold() only
    act_stats = ActStats(targets) if "act_sq_sum" in crit.accumulators else None
    counters: dict[str, Any] = {"batches": 0, "tokens": 0, "mean_loss": float("nan"), "seconds": 0.0}
    if crit.needs_calibration:
        if batches is None:
            raise ValueError(f"criterion {cfg.criterion!r} needs calibration batches")
        counters = calibrate_sharded(
            model, batches, grad_stats, act_stats, params, loss_fn=loss_fn, device=device,
            accelerator=accelerator, progress=cfg.progress, total=num_batches,
        )  # fmt: skip
        if counters["batches"] == 0:
            raise ValueError(f"criterion {cfg.criterion!r} needs calibration data but no batch was given")
    report["timings_s"]["calibration"] = counters["seconds"]

    kw = criterion_params(cfg)
    score_fn = make_score_fn(crit, kw, local, grad_stats, act_stats)

    start = time.perf_counter()
    names = list(params)
    masks: dict[str, torch.Tensor] = {}
    rows: list[list[float]] = []
    with torch.no_grad():
        stream = iter_sharded_masks(
            names, score_fn, scope=cfg.scope, sparsity=cfg.sparsity, nm=cfg.nm,
            numel={n: p.numel() for n, p in params.items()}, chunk_elems=cfg.select_chunk_elems,
        )  # fmt: skip
        for name, mask in stream:
            apply_mask_(local[name], mask)
            s = mask_summary(mask, cfg.nm) if mask.numel() else {"numel": 0, "masked": 0}
            valid = s.get("nm_groups_valid", 1)
            rows.append([s["numel"], s["masked"], int((local[name] == 0).sum()), 1 - valid])
            if return_masks:
                masks[name] = mask.cpu()
    report["timings_s"]["selection"] = time.perf_counter() - start

    flat = all_reduce_scalars([v for r in rows for v in r])  # local counts -> global, one collective
    per_tensor: dict[str, dict[str, int]] = {}
    for i, name in enumerate(names):
        numel, masked, zeros, invalid = (int(v) for v in flat[4 * i : 4 * i + 4])
        per_tensor[name] = {"numel": numel, "masked": masked}
        if cfg.nm is not None:
            per_tensor[name]["nm_groups_valid"] = int(invalid == 0)
        per_tensor[name]["zeros"] = zeros
    numel = sum(t["numel"] for t in per_tensor.values())
    zeros = sum(t["zeros"] for t in per_tensor.values())
    report.update(
        {
            "criterion": cfg.criterion,
            "criterion_params": kw,
            "scope": cfg.scope if cfg.nm is None else "n:m",
            "pattern": cfg.pattern,
            "target_sparsity": cfg.sparsity,
            "targets": len(per_tensor),
            "target_weights": numel,
            "masked_weights": sum(t["masked"] for t in per_tensor.values()),
            "zero_weights": zeros,
            "overall_sparsity": zeros / numel if numel else 0.0,
            "calibration": {
                "batches": counters["batches"],
                "tokens": counters["tokens"],
                "batch_size": cfg.batch_size,
                "mean_loss": counters["mean_loss"],
                "statistics": sorted(crit.accumulators),
                "skipped_nonfinite": {
                    n: c for n, c in (grad_stats.skipped if grad_stats else {}).items() if c
                },
                "processes": world()[1],
                "sharding": "fsdp2",
                "reduce": counters.get("reduce"),
            },
            "per_tensor": per_tensor,
        }
    )
    return PruneResult(masks=masks if return_masks else None, report=report)


def full_state_dict(model: nn.Module, accelerator=None) -> dict[str, torch.Tensor]:
    """The whole (pruned) state dict on the main process, on the CPU; {} on the others. Collective."""
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        sd = accelerator.get_state_dict(model) or {}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(model, options=opts)
    # A tied weight (lm_head = embeddings) comes back as two separate tensors; keep the first name
    # only, as save_pretrained does for an unsharded model, so the files match a 1-process run.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in sd:
            del sd[name]
        first.setdefault(id(p), name)
    return sd


def prepare_fsdp2(model: nn.Module, accelerator) -> nn.Module:
    """Accelerate's own FSDP2 sharding of `model` (its wrap policy, mesh and settings).

    Accelerate 1.15 refuses `prepare(model)` alone under FSDP2 ("a model and optimizer must be passed
    together"): it is given a plain SGD with lr 0 that is never stepped and holds no state.
    """
    unused = torch.optim.SGD([p for p in model.parameters()], lr=0.0)
    model, _ = accelerator.prepare(model, unused)
    return model


def uses_fsdp(cfg: PruneConfig, accelerator) -> bool:
    """Shard the model: Accelerate configured for FSDP, or asked for (cfg.fsdp), with several processes.

    On CPU processes Accelerate ignores an FSDP launch config (it sets ACCELERATE_USE_FSDP but gives
    MULTI_CPU + DDP semantics); the launch config is honoured here by sharding with torch itself.
    """
    import os

    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return (bool(cfg.fsdp) or launched_fsdp) and accelerator.num_processes > 1


def run_sharded(model: nn.Module, batches, cfg: PruneConfig, accelerator, device) -> tuple:
    """Shard, prune and gather: (sharded model, PruneResult, full state dict on the main process)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"fsdp_version {version} flattens weights across ranks: set fsdp_version: 2 in the "
                "accelerate config (row sharding)"
            )
        model = prepare_fsdp2(model.to(device), accelerator)
    else:  # Accelerate offers FSDP on accelerators only (CPU processes get DDP): shard with torch
        model = fully_shard_model(model, device)
    result = prune_sharded_(model, batches, cfg, accelerator=accelerator, device=device, return_masks=False,
                            num_batches=len(batches) if batches is not None else None)  # fmt: skip
    return model, result, full_state_dict(model, accelerator)
