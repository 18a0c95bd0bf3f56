"""Layer-wise execution: prune a model one decoder block at a time, as SparseGPT and Wanda do.

1. The calibration batches run through the model until the first block is called; a forward pre-hook
   records that call's positional inputs and keyword arguments (hidden states, rotary embeddings,
   attention mask, position ids, ...) and raises a sentinel to stop the forward. Nothing is assumed
   about the block's signature; only a KV cache is dropped, since blocks are re-run.
2. For each block in the model's block list (`targets.block_list_prefix`): forward hooks gather what its
   targets need (Hessians for OBS reconstruction, activation sums for wanda-like criteria) while the
   recorded inputs run through it; its targets are pruned (and reconstructed); then the block runs
   again and its outputs, computed by the already-pruned block, become the next block's inputs.
   With `sequential=False` the outputs are taken before pruning instead (statistics of the dense model).

Only one block's statistics are alive at a time. `offload_inputs` keeps the recorded inputs on CPU and
moves one sample at a time to the block's device.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import criteria
from .calibrate import LossFn, causal_lm_loss, to_device
from .config import ConfigError, PruneConfig
from .masks import apply_mask_, iter_masks, mask_summary
from .pruner import Statistics, gather_statistics, make_score_fn
from .reconstruct import Hessians, lsq_update_, obs_update_, sparsegpt_
from .stats import ActStats


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _drop_cache(value: Any) -> Any:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return value
    return None if isinstance(value, Cache) else value


def _move(obj: Any, device: torch.device | str) -> Any:
    return to_device(obj, torch.device(device))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn = causal_lm_loss,
    device: torch.device | None = None,
    store: torch.device | str | None = None,
) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `first_block`'s call for every batch, moved to `store` (default: as they come)."""
    device = device or next(model.parameters()).device
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        kwargs = {k: _drop_cache(v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if store is not None:
            args, kwargs = _move(args, store), _move(kwargs, store)
        calls.append((tuple(args), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    if old_cache is not None:
        config.use_cache = False
    try:
        for batch in batches:
            try:
                loss_fn(model, to_device(batch, device))
            except _StopForward:
                continue
            raise RuntimeError("the model finished a forward pass without calling its first block")
    finally:
        handle.remove()
        if old_cache is not None:
            config.use_cache = old_cache
    return calls


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.no_grad()
def run_block(
    block: nn.Module, calls: list[tuple[tuple, dict]], device: torch.device, keep_outputs: bool
) -> None:
    """Run every recorded call through `block`; with `keep_outputs`, its outputs replace the hidden states."""
    for i, (args, kwargs) in enumerate(calls):
        store = _hidden(args, kwargs).device
        a, kw = _move(args, device), _move(kwargs, device)
        out = block(*a, **kw)
        if keep_outputs:
            h = out[0] if isinstance(out, tuple | list) else out
            calls[i] = _with_hidden(args, kwargs, h.to(store))


class _StageInputsSeen(Exception):
    """Raised by a hook to stop a block's forward once a stage's last module has read its input."""


def run_block_until(block: nn.Module, calls: list[tuple[tuple, dict]], device, module: nn.Module) -> None:
    """Run every recorded call through `block` only up to (and including) `module`; outputs are dropped."""

    def stop(*_):
        raise _StageInputsSeen

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                try:
                    block(*_move(args, device), **_move(kwargs, device))
                except _StageInputsSeen:
                    pass
    finally:
        handle.remove()


def call_stages(
    block: nn.Module, modules: dict[str, nn.Module], calls: list[tuple[tuple, dict]], device
) -> list[list[str]]:
    """The block's target modules in call order, grouped into stages of modules that read the very same
    input tensor (found by running `calls`, normally one sample, with recording hooks)."""
    stages: list[list[str]] = []
    last: list = [None]

    def make_hook(name: str):
        def hook(mod, inputs, output) -> None:
            if any(name in g for g in stages):
                return
            if last[0] is not None and inputs[0] is last[0] and stages:
                stages[-1].append(name)
            else:
                stages.append([name])
            last[0] = inputs[0]

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_block(block, calls, device, keep_outputs=False)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if not any(n in g for g in stages)]
    if missing:
        raise RuntimeError(f"true_sequential: target {missing[0]!r} was never called by its block")
    return stages


def _split_by_block(targets: dict[str, nn.Module], prefix: str, n_blocks: int) -> list[dict[str, nn.Module]]:
    per: list[dict[str, nn.Module]] = [{} for _ in range(n_blocks)]
    for name, module in targets.items():
        rest = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None
        index = rest.split(".", 1)[0] if rest else None
        if index is None or not index.isdigit():
            raise ConfigError(
                f"target {name!r} is outside the block list {prefix!r}: layer-wise mode prunes block targets only"
            )
        per[int(index)][name] = module
    return per


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    out = {"cpu_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated(device))
    return out


def prune_sequential_(
    model: nn.Module,
    batches: Iterable[Any] | None,
    cfg: PruneConfig,
    targets: dict[str, nn.Module],
    *,
    loss_fn: LossFn = causal_lm_loss,
    accelerator=None,
    stats: Statistics | None = None,
    sparsity: dict[str, float] | None = None,
    num_batches: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Prune `targets` block by block; returns (masks on CPU, report fields).

    `stats`: already-filled whole-model statistics (e.g. loaded from a cache); when the criterion needs
    gradients and none are given, the usual whole-model calibration pass computes them first.
    `sparsity`: optional per-tensor sparsity (non-uniform allocation) keyed by weight name.
    """
    from .targets import block_list_prefix

    if batches is None:
        raise ValueError("layer-wise pruning needs calibration batches")
    batches = list(batches)
    if not batches:
        raise ValueError("layer-wise pruning needs calibration data but no batch was given")
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    prefix = block_list_prefix(model)
    if prefix is None:
        raise ConfigError("layer-wise mode needs a model with a list of repeated blocks (none found)")
    layers = model.get_submodule(prefix)
    per_block = _split_by_block(targets, prefix, len(layers))
    is_sgpt = cfg.criterion == "sparsegpt"
    crit = None if is_sgpt else criteria.get(cfg.criterion)
    # whole-model statistics (gradients need every block): gathered once, on the dense model
    whole = set() if crit is None else crit.accumulators - {"act_sq_sum"}
    if is_sgpt and cfg.sparsegpt_grad_exp:
        whole = set(PRIOR_SUMS[cfg.sparsegpt_prior])
    needs_act = crit is not None and "act_sq_sum" in crit.accumulators  # per block, on pruned inputs
    reconstruct = is_sgpt or cfg.reconstruct != "none"
    sequential = cfg.sequential is not False
    timings: dict[str, float] = {}
    params = {f"{n}.weight": m.weight for n, m in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)

    if whole and stats is None:
        stats = gather_statistics(model, batches, cfg, targets, whole, loss_fn=loss_fn,
                                  accelerator=accelerator, num_batches=num_batches)  # fmt: skip
    empty = {"batches": len(batches), "tokens": 0, "mean_loss": float("nan"), "seconds": 0.0}
    stats = stats or Statistics(None, None, None, empty)
    grad_stats, tok_stats, dense_acts, counters = stats.grad, stats.token, stats.act, stats.counters
    timings["gradient_calibration"] = counters["seconds"]

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    store = torch.device("cpu") if cfg.offload_inputs else None
    calls = capture_block_inputs(model, layers[0], batches, loss_fn=loss_fn, device=device, store=store)
    tokens = sum(int(_hidden(a, k).shape[:-1].numel()) for a, k in calls)
    timings["capture_inputs"] = time.perf_counter() - start

    kw = _criterion_kwargs(cfg)
    scope = cfg.scope
    if scope == "global" and cfg.nm is None and not is_sgpt:
        # the scores read whole-model statistics only (config refuses activation criteria), so the
        # global threshold over the dense scores fixes each tensor's pruned count before any block runs
        sparsity = global_counts(crit, kw, params, grad_stats, tok_stats, cfg)
        scope = "tensor"

    masks: dict[str, torch.Tensor] = {}
    per_tensor: dict[str, dict[str, Any]] = {}
    hessian_bytes: dict[str, int] = {}

    def prune_group(group: list[str], hess: Hessians | None, acts: ActStats | None) -> None:
        score_fn = None if is_sgpt else make_score_fn(crit, kw, params, grad_stats, acts, tok_stats)
        for pname in group:
            weight = params[pname].data
            H = hess.hessian(pname.removesuffix(".weight")) if hess is not None else None
            if is_sgpt:
                prior = None
                if cfg.sparsegpt_grad_exp:
                    prior = sparsegpt_prior(cfg, pname, grad_stats, tok_stats, dense_acts).to(weight.device)
                # lsq refits from the dense weights: sparsegpt_ overwrites them with its greedy update
                dense_w = weight.clone() if cfg.reconstruct == "lsq" else None
                mask, info = sparsegpt_(
                    weight, H, sparsity=(sparsity or {}).get(pname, cfg.sparsity), nm=cfg.nm,
                    blocksize=cfg.blocksize, percdamp=cfg.percdamp, prior=prior,
                )  # fmt: skip
                if dense_w is not None:  # keep SparseGPT's mask, refit the kept weights exactly
                    weight.copy_(dense_w)
                    del dense_w
                    info = {**info, **lsq_update_(weight, H, mask, percdamp=cfg.percdamp)}
            else:
                ((_, mask),) = iter_masks(
                    [pname], score_fn, scope=scope, sparsity=sparsity or cfg.sparsity, nm=cfg.nm,
                    chunk_elems=cfg.select_chunk_elems,
                )  # fmt: skip
                mask = mask.view(weight.shape).to(weight.device)
                info: dict[str, Any] = {}
                if cfg.reconstruct == "lsq":
                    info = lsq_update_(weight, H, mask, percdamp=cfg.percdamp)
                elif reconstruct:
                    info = obs_update_(weight, H, mask, blocksize=cfg.blocksize, percdamp=cfg.percdamp)
                else:
                    apply_mask_(weight, mask)
            if H is not None:
                hessian_bytes[pname] = hess.nbytes(pname.removesuffix(".weight"))
            _record(pname, mask, info, params, per_tensor, masks, cfg)

    t_stats = t_prune = t_forward = 0.0
    try:
        for index, block in enumerate(
            tqdm(layers, desc="layer-wise pruning", disable=not cfg.progress, unit="block")
        ):
            block_targets = per_block[index]
            if not block_targets:
                t = time.perf_counter()
                run_block(block, calls, device, keep_outputs=True)
                t_forward += time.perf_counter() - t
                continue
            # true_sequential: the block's targets in stages of modules sharing one input (q/k/v, o,
            # gate/up, down); each stage's statistics are taken after the stages before it are pruned
            stages = call_stages(block, block_targets, calls[:1], device) if cfg.true_sequential else None
            for group in stages or [list(block_targets)]:
                t = time.perf_counter()
                mods = {n: block_targets[n] for n in group}
                hess = Hessians(mods).attach() if reconstruct else None
                acts = ActStats(mods).attach() if needs_act else None
                try:
                    if stages is None:
                        run_block(block, calls, device, keep_outputs=not sequential)
                    else:
                        run_block_until(block, calls, device, block_targets[group[-1]])
                finally:
                    for s in (hess, acts):
                        if s is not None:
                            s.detach()
                t_stats += time.perf_counter() - t
                t = time.perf_counter()
                prune_group([f"{n}.weight" for n in group], hess, acts)
                if hess is not None:
                    hess.free()
                t_prune += time.perf_counter() - t

            if sequential:
                t = time.perf_counter()
                run_block(block, calls, device, keep_outputs=True)
                t_forward += time.perf_counter() - t
    finally:
        model.train(was_training)
    del calls
    timings.update(
        {"layer_statistics": t_stats, "prune_and_reconstruct": t_prune, "layer_forward": t_forward}
    )
    report = {
        "mode": {
            "layer_wise": True,
            "sequential": sequential,
            "reconstruct": ("obs+lsq" if cfg.reconstruct == "lsq" else "obs") if is_sgpt else cfg.reconstruct,
            "blocksize": cfg.blocksize,
            "percdamp": cfg.percdamp,
            "offload_inputs": cfg.offload_inputs,
            "sparsegpt_grad_exp": cfg.sparsegpt_grad_exp if is_sgpt else None,
            "true_sequential": cfg.true_sequential,
        },
        "hessian_bytes": {
            "per_tensor": hessian_bytes,
            "max_per_layer": max(hessian_bytes.values(), default=0),
            "note": "fp32 in_features^2 x 4; q/k/v and gate/up share one",
        },
        "peak_memory_bytes": peak_memory_bytes(device),
        "calibration_counters": {**counters, "tokens": counters["tokens"] or tokens},
        "needs": sorted(
            whole | ({"act_sq_sum"} if needs_act else set()) | ({"hessian"} if reconstruct else set())
        ),
        "timings_s": timings,
        "per_tensor": per_tensor,
    }
    return masks, report


# sparsegpt_prior -> the whole-model sums it reads
PRIOR_SUMS = {"fisher": ("grad_sq_sum",), "token_fisher": ("token_grad_sq_sum", "act_sq_sum")}


def sparsegpt_prior(cfg: PruneConfig, pname: str, grad_stats, tok_stats, acts) -> torch.Tensor:
    """The gradient factor multiplying SparseGPT's OBS saliency w^2 / [H^-1]_jj^2, to the power
    `sparsegpt_grad_exp`. fisher: E_b[g^2] per weight. token_fisher: E_t[d_t,i^2 x_t,j^2] / E_t[x_t,j^2],
    the loss curvature of output i at the tokens where input j is large: the saliency already holds
    the input energy through H, so only the output side is added (statistics of the dense model)."""
    tiny = torch.finfo(torch.float32).tiny
    if cfg.sparsegpt_prior == "fisher":
        factor = grad_stats.mean("grad_sq_sum", pname)
    else:
        module = pname.removesuffix(".weight")
        factor = tok_stats.mean(module) / acts.mean_sq(module).clamp_min(tiny).view(1, -1)
    return factor.clamp_min(tiny).pow(cfg.sparsegpt_grad_exp)


def _criterion_kwargs(cfg: PruneConfig) -> dict[str, float]:
    from .pruner import criterion_params

    return {} if cfg.criterion == "sparsegpt" else criterion_params(cfg)


def _record(pname, mask, info, params, per_tensor, masks, cfg) -> None:
    w = params[pname]
    per_tensor[pname] = {
        **mask_summary(mask, cfg.nm),
        "zeros": int((w == 0).sum()),
        **{k: v for k, v in info.items() if k in ("damp", "dead_inputs", "obs_loss")},
    }
    masks[pname] = mask.cpu()


def global_counts(crit, kw, params, grad_stats, tok_stats, cfg: PruneConfig) -> dict[str, float]:
    """Per-tensor sparsity k_t / n_t where k_t is how many of tensor t's weights the exact global
    selection over all (dense) scores prunes; per-tensor selection with it reproduces the global mask."""
    names = list(params)
    score_fn = make_score_fn(crit, kw, params, grad_stats, None, tok_stats)
    shapes = {n: params[n].shape for n in names}
    out = {}
    for name, mask in iter_masks(names, score_fn, scope="global", sparsity=cfg.sparsity,
                                 chunk_elems=cfg.select_chunk_elems, shapes=shapes,
                                 scores_dir=cfg.scores_dir):  # fmt: skip
        out[name] = int(mask.sum()) / mask.numel()
    return out


def prune_layer_wise_(
    model: nn.Module,
    batches: Iterable[Any] | None,
    cfg: PruneConfig,
    *,
    loss_fn: LossFn = causal_lm_loss,
    targets: dict[str, nn.Module] | None = None,
    accelerator=None,
    return_masks: bool = True,
    num_batches: int | None = None,
    stats: Statistics | None = None,
    sparsity: dict[str, float] | None = None,
):
    """`pruner.prune_` for the layer-wise modes: same PruneResult and report keys, plus the mode's."""
    from .pruner import PruneResult
    from .targets import find_targets

    targets = targets if targets is not None else find_targets(model, cfg.include, cfg.exclude)
    start = time.perf_counter()
    masks, extra = prune_sequential_(
        model, batches, cfg, targets, loss_fn=loss_fn, accelerator=accelerator, stats=stats,
        sparsity=sparsity, num_batches=num_batches,
    )  # fmt: skip
    timings = extra.pop("timings_s")
    timings["layer_wise_total"] = time.perf_counter() - start
    per_tensor = extra.pop("per_tensor")
    counters = extra.pop("calibration_counters")
    numel = sum(t["numel"] for t in per_tensor.values())
    zeros = sum(t["zeros"] for t in per_tensor.values())
    report = {
        "timings_s": {"calibration": timings.get("gradient_calibration", 0.0), **timings},
        "criterion": cfg.criterion,
        "criterion_params": _criterion_kwargs(cfg),
        "scope": "n:m" if cfg.nm is not None else ("block" if cfg.criterion == "sparsegpt" else cfg.scope),
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
            "statistics": extra["needs"],
            "processes": accelerator.num_processes if accelerator is not None else 1,
        },
        **{k: v for k, v in extra.items() if k != "needs"},
        "per_tensor": per_tensor,
    }
    return PruneResult(masks=masks if return_masks else None, report=report)
