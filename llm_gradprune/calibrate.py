"""The one Accelerate loop that runs calibration batches and fills the statistics.

The loop does not own the user's training step: it takes any model, an iterable of batches and a
`loss_fn(model, batch) -> scalar loss` (the causal-LM loss by default). No optimizer step is taken.

Under several processes the model is deliberately *not* wrapped in DistributedDataParallel: DDP would
average gradients across ranks during backward, and our statistics are sums over micro-batches of
per-batch quantities (|g|, g^2) that an average corrupts. Each rank folds its own micro-batches into
local fp32 sums; `reduce_stats_` adds them across ranks once at the end.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpointing import enable_activation_checkpointing
from .stats import ActStats, GradStats

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def causal_lm_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token loss of a block of token ids (labels = inputs, shifted inside the model)."""
    if isinstance(batch, dict):
        return model(**batch).loss
    return model(input_ids=batch, labels=batch).loss


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_tokens(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"].numel()
    return 0


def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    grad_stats: GradStats | None,
    act_stats: ActStats | None = None,
    *,
    accelerator=None,
    loss_fn: LossFn = causal_lm_loss,
    progress: bool = True,
    total: int | None = None,
    grad_accum: int = 1,
    checkpointing: bool = False,
    checkpointer=None,
) -> dict[str, float]:
    """Forward + backward every batch once, folding statistics in through hooks. Returns counters.

    `grad_accum` > 1 makes one gradient sample the mean gradient of that many consecutive micro-batches
    (a last, shorter group counts as one sample too); `checkpointing` recomputes layer activations in
    backward (see checkpointing.py).
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()  # calibration measures the deployed model: no dropout
    undo_checkpointing = None
    if checkpointing and grad_stats is not None:
        undo_checkpointing = enable_activation_checkpointing(model)
    if grad_stats is not None:
        grad_stats.group = grad_accum
        grad_stats.attach()
    if act_stats is not None:
        act_stats.attach()
    n_batches = n_tokens = n_samples = in_group = 0
    loss_sum = 0.0
    if checkpointer is not None:  # resume.CalibCheckpointer: continue saved sums, skip their batches
        n_batches, n_tokens, loss_sum = checkpointer.restore(grad_stats, act_stats)
        n_samples = -(-n_batches // grad_accum)
        batches = itertools.islice(batches, n_batches, None)
        total = None if total is None else total - n_batches
    start = time.perf_counter()
    main = accelerator is None or accelerator.is_local_main_process
    try:
        for batch in tqdm(
            batches, total=total, desc="calibration", disable=not (progress and main), unit="batch"
        ):
            batch = to_device(batch, device)
            if grad_stats is not None:
                loss = loss_fn(model, batch)
                if act_stats is not None:
                    act_stats.paused = True  # a checkpointed layer's recompute must not count twice
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                if act_stats is not None:
                    act_stats.paused = False
            else:  # activation statistics only: no backward needed
                with torch.no_grad():
                    loss = loss_fn(model, batch)
            loss_sum += float(loss.detach())
            n_batches += 1
            n_tokens += count_tokens(batch)
            in_group += 1
            if in_group == grad_accum:
                n_samples += 1
                in_group = 0
                if grad_stats is not None and grad_accum > 1:
                    grad_stats.end_group(grad_accum)
            if checkpointer is not None:
                checkpointer.after_batch(n_batches, n_tokens, loss_sum)
        if in_group:
            n_samples += 1
            if grad_stats is not None and grad_accum > 1:
                grad_stats.end_group(in_group)
        if checkpointer is not None:
            # the complete sums too: a crash during selection or saving then recalibrates nothing
            checkpointer.end(n_batches, n_tokens, loss_sum)
    finally:
        if undo_checkpointing is not None:
            undo_checkpointing()
        if grad_stats is not None:
            grad_stats.detach()
        if act_stats is not None:
            act_stats.detach()
        model.train(was_training)
    return {
        "batches": n_batches,
        "samples": n_samples,
        "tokens": n_tokens,
        "mean_loss": loss_sum / max(n_batches, 1),
        "seconds": time.perf_counter() - start,
    }


def reduce_stats_(
    grad_stats: GradStats | None,
    act_stats: ActStats | None,
    counters: dict,
    accelerator,
    chunk_elems: int = 1 << 22,
) -> None:
    """Sum local statistics and counters across processes, in place (no-op with one process).

    The sums are reduced in chunks of at most `chunk_elems` elements (`distributed.all_reduce_sum_`),
    so the reduction needs one chunk of extra memory, not a second copy of the statistics; its cost
    lands in counters["reduce"] (calls, elements, seconds).
    """
    if accelerator is None or accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    from .distributed import all_reduce_sum_

    tensors: list[torch.Tensor] = []
    if grad_stats is not None:
        tensors += [t for per in grad_stats.sums.values() for t in per.values()]
    if act_stats is not None:
        tensors += list(act_stats.sums.values())
    counters["reduce"] = all_reduce_sum_(tensors, chunk_elems)
    scalars: list[float] = [
        counters["batches"],
        counters["tokens"],
        counters["mean_loss"] * counters["batches"],
    ]
    if grad_stats is not None:
        names = list(grad_stats.counts)
        scalars += [grad_stats.counts[n] for n in names] + [grad_stats.skipped[n] for n in names]
    if act_stats is not None:
        act_names = list(act_stats.tokens)
        scalars += [act_stats.tokens[n] for n in act_names]
    packed = torch.tensor(scalars, dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    vals = packed.tolist()
    counters["batches"], counters["tokens"] = int(vals[0]), int(vals[1])
    counters["mean_loss"] = vals[2] / max(counters["batches"], 1)
    i = 3
    if grad_stats is not None:
        k = len(names)
        grad_stats.counts = {n: int(v) for n, v in zip(names, vals[i : i + k], strict=True)}
        grad_stats.skipped = {n: int(v) for n, v in zip(names, vals[i + k : i + 2 * k], strict=True)}
        i += 2 * k
    if act_stats is not None:
        act_stats.tokens = {n: int(v) for n, v in zip(act_names, vals[i:], strict=True)}
