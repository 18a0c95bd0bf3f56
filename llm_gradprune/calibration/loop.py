"""The one Accelerate loop that runs calibration batches and fills the statistics, on every path.

The loop does not own the user's training step: it takes any model, an iterable of batches and a
`loss_fn(model, batch) -> scalar loss` (the causal-LM loss by default). No optimizer step is taken.

How the work spreads over processes is the collective's business (`parallel.Collective`):

- one process, or a replicated model: each rank runs its own micro-batches. The model is deliberately
  *not* wrapped in DistributedDataParallel: DDP would average gradients across ranks during backward,
  and our statistics are sums over micro-batches of per-batch quantities (|g|, g^2) that an average
  corrupts. Each rank folds its own micro-batches into local fp32 sums (gradients through hooks, the
  moment autograd produces them); `reduce_statistics_` adds them across ranks once at the end.
- rows sharded with FSDP2 (`RowShards`): every rank runs its piece of every micro-batch, FSDP's
  reduce-scatter hands it its rows of the micro-batch gradient, and those are folded after backward,
  a non-finite one skipped by all ranks together.

Gradient accumulation, activation recompute, statistics placement, skipping of non-finite gradients
and resume are this loop's, so they behave the same wherever they are allowed (`support.py`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..faults import pause_point
from ..parallel import Collective
from ..status import set_stage
from .recompute import enable_activation_checkpointing
from .stats import Statistics, make_statistics

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def causal_lm_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token loss of a micro-batch of token blocks (labels = inputs, shifted inside the model)."""
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


def empty_counters() -> dict[str, Any]:
    """The counters of a pass that ran no batch."""
    return {
        "batches": 0,
        "samples": 0,
        "tokens": 0,
        "loss_sum": 0.0,
        "mean_loss": float("nan"),
        "seconds": 0.0,
    }


@dataclass
class _Tally:
    """What a calibration pass has run so far."""

    batches: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    samples: int = 0  # gradients: accumulations closed
    accumulated: int = 0  # micro-batches run in the accumulation still open

    def counters(self, seconds: float, recomputed: int) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "tokens": self.tokens,
            "loss_sum": self.loss_sum,
            "mean_loss": self.loss_sum / max(self.batches, 1),
            "seconds": seconds,
            "recomputed_layers": recomputed,
        }


@dataclass
class _Pass:
    """The fixed parts of one calibration pass; `step` takes one micro-batch through it."""

    model: nn.Module
    stats: Statistics
    collective: Collective
    accelerator: Any
    loss_fn: LossFn
    device: torch.device
    grad_accum: int  # micro-batches per gradient

    def __post_init__(self) -> None:
        self.forward_hooked = self.stats.forward_hooked()
        self.counting_inputs = self.stats.counting_inputs()

    def step(self, batch: Any, tally: _Tally) -> None:
        """This rank's piece of `batch`: forward, backward when a statistic needs it, counted in `tally`."""
        piece, share = self.collective.piece(batch)
        piece = to_device(piece, self.device)
        for acc in self.forward_hooked:  # a rank's empty piece (row shards) records nothing
            acc.paused = not share
        if self.stats.needs_backward:
            loss = self._backward(piece, share)
        else:  # forward statistics only: no backward needed
            with torch.no_grad():
                loss = self.loss_fn(self.model, piece)
        for acc in self.forward_hooked:
            acc.paused = False
        tally.loss_sum += float(loss.detach()) * share if share != 1.0 else float(loss.detach())
        tally.batches += 1
        tally.tokens += count_tokens(piece) if share else 0
        tally.accumulated += 1
        if tally.accumulated == self.grad_accum:
            self.end_accumulation(tally)

    def _backward(self, piece: Any, share: float) -> torch.Tensor:
        loss = self.loss_fn(self.model, piece)
        for acc in self.counting_inputs:
            acc.paused = True
        scale = self.collective.grad_scale(share)
        scaled = loss if scale == 1.0 else loss * scale
        if self.accelerator is not None:
            self.accelerator.backward(scaled)
        else:
            scaled.backward()
        grad = self.stats.grad
        if grad is not None and grad.row_sharded:
            grad.collect_()
        return loss

    def end_accumulation(self, tally: _Tally) -> None:
        """Close the accumulation: its micro-batches' gradients become one sample."""
        grad = self.stats.grad
        if grad is not None and self.grad_accum > 1:
            grad.end_accumulation(tally.accumulated)
        tally.samples += 1
        tally.accumulated = 0


def _grad_accum(stats: Statistics, collective: Collective, grad_accum: int | None) -> int:
    grad = stats.grad
    if grad is None:
        return 1 if grad_accum is None else grad_accum
    if grad.row_sharded != collective.rows_sharded:
        raise ValueError(
            "the gradient statistics were built for another collective: make_statistics(collective=)"
        )
    if grad_accum is not None and grad_accum != grad.grad_accum:
        raise ValueError(
            f"grad_accum {grad_accum} given to the loop, but the gradient statistics accumulate "
            f"{grad.grad_accum}: build them with GradStats(grad_accum=) / make_statistics(grad_accum=)"
        )
    return grad.grad_accum


def _attach(model: nn.Module, stats: Statistics, checkpointing: bool):
    """Hook every accumulator in (and recompute activations when asked): (undo recompute, layers)."""
    undo, recomputed = None, 0
    if checkpointing and stats.needs_backward:
        undo, recomputed = enable_activation_checkpointing(model)
    for acc in stats.accumulators():
        acc.attach()
    return undo, recomputed


def _resume(calib_state, stats: Statistics, tally: _Tally, batches: Iterable[Any], grad_accum: int):
    """Continue a saved pass (io.calib_state): its sums and counts loaded, the batches it ran skipped."""
    tally.batches, tally.tokens, tally.loss_sum = calib_state.restore(stats)
    tally.samples = -(-tally.batches // grad_accum)
    return itertools.islice(batches, tally.batches, None)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    stats: Statistics,
    *,
    collective: Collective | None = None,
    accelerator=None,
    loss_fn: LossFn = causal_lm_loss,
    progress: bool = True,
    total: int | None = None,
    grad_accum: int | None = None,
    checkpointing: bool = False,
    calib_state=None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Forward (+ backward when a statistic needs it) every batch once, folding statistics in. Returns counters.

    One gradient is the mean gradient of an accumulation of consecutive micro-batches
    (a last, shorter one counts too); its length is the gradient statistics' own
    (`GradStats(grad_accum=)`), `grad_accum` without them. `checkpointing` recomputes layer activations in
    backward (see recompute.py); `calib_state` (io.calib_state) saves and restores partial sums.
    """
    collective = collective or Collective()
    if device is None:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
    grad_accum = _grad_accum(stats, collective, grad_accum)
    one = _Pass(model, stats, collective, accelerator, loss_fn, device, grad_accum)
    was_training = model.training
    model.eval()  # calibration measures the deployed model: no dropout
    undo_checkpointing, recomputed = _attach(model, stats, checkpointing)
    tally, all_batches = _Tally(), total
    main = (accelerator is None or accelerator.is_local_main_process) and collective.rank == 0
    try:
        if calib_state is not None:
            batches = _resume(calib_state, stats, tally, batches, grad_accum)
            total = None if total is None else total - tally.batches
        start = time.perf_counter()
        for batch in tqdm(
            batches, total=total, desc="calibration", disable=not (progress and main), unit="batch"
        ):
            set_stage(
                f"calibration, batch {tally.batches + 1}" + (f" of {all_batches}" if all_batches else "")
            )
            one.step(batch, tally)
            if calib_state is not None:
                calib_state.after_batch(tally.batches, tally.tokens, tally.loss_sum)
            pause_point("batch", tally.batches)
        if tally.accumulated:
            one.end_accumulation(tally)
        if calib_state is not None:
            # the complete sums too: a crash during selection or saving then recalibrates nothing
            calib_state.end(tally.batches, tally.tokens, tally.loss_sum)
    finally:
        if undo_checkpointing is not None:
            undo_checkpointing()
        for acc in stats.accumulators():
            acc.detach()
        model.train(was_training)
    return tally.counters(time.perf_counter() - start, recomputed)


def reduce_statistics_(
    stats: Statistics, collective: Collective, chunk_elems: int = 1 << 22
) -> dict[str, Any]:
    """Sum local statistics and their per-tensor counts across processes, in place (no-op with one).

    Sums are reduced in chunks of at most `chunk_elems` elements (`parallel.all_reduce_sum_`), so the
    reduction needs one chunk of extra memory, not a second copy. Row-sharded sums (each rank's own
    rows, FSDP2) are never added. Returns what it cost (calls, elements, seconds).
    """
    accs = [a for a in stats.accumulators() if not getattr(a, "row_sharded", False)]
    if collective.processes == 1:
        return {"calls": 0, "elements": 0, "seconds": 0.0}
    info = collective.sum_([t for a in accs for t in a.tensors().values()], chunk_elems)
    layout = [(a, key, list(per)) for a in accs for key, per in a.counters().items()]
    vals = collective.sum_scalars([float(a.counters()[key][n]) for a, key, names in layout for n in names])
    i = 0
    for a, key, names in layout:
        a.load_counters({**a.counters(), key: dict(zip(names, vals[i : i + len(names)], strict=True))})
        i += len(names)
    return info


def reduce_counters_(counters: dict[str, Any], collective: Collective) -> None:
    """Sum tokens and loss across processes; batches and gradients too, unless every rank saw
    every micro-batch (row shards)."""
    if collective.processes == 1:
        return
    vals = collective.sum_scalars(
        [
            float(counters["tokens"]),
            counters["loss_sum"],
            float(counters["batches"]),
            float(counters.get("samples", 0)),
        ]
    )
    counters["tokens"], counters["loss_sum"] = int(vals[0]), vals[1]
    if not collective.splits_batches:
        counters["batches"], counters["samples"] = int(vals[2]), int(vals[3])
    counters["mean_loss"] = counters["loss_sum"] / max(counters["batches"], 1)


def gather_statistics(
    model: nn.Module,
    batches: Iterable[Any] | None,
    needs: set[str],
    modules: dict[str, nn.Module],
    *,
    collective: Collective | None = None,
    stats_device: str | None = None,
    grad_accum: int = 1,
    checkpointing: bool = False,
    chunk_elems: int = 1 << 22,
    loss_fn: LossFn = causal_lm_loss,
    accelerator=None,
    progress: bool = True,
    num_batches: int | None = None,
    calib_state=None,
) -> tuple[Statistics, dict[str, Any]]:
    """Allocate exactly the accumulators `needs` (mean statistic names) read, fill them in one pass of
    the loop and reduce them across processes; (statistics, counters). No pass when nothing is needed."""
    collective = collective or Collective()
    for p in model.parameters():
        p.requires_grad_(False)
    stats = make_statistics(needs, modules, device=stats_device, grad_accum=grad_accum, collective=collective)
    if not needs:
        return stats, empty_counters()
    if batches is None:
        raise ValueError("calibration statistics need batches, but none were given")
    counters = calibrate(
        model, batches, stats, collective=collective, accelerator=accelerator, loss_fn=loss_fn,
        progress=progress, total=num_batches, grad_accum=grad_accum, checkpointing=checkpointing,
        calib_state=calib_state,
    )  # fmt: skip
    counters["reduce"] = reduce_statistics_(stats, collective, chunk_elems=chunk_elems)
    reduce_counters_(counters, collective)
    if counters["batches"] == 0:
        raise ValueError("calibration needs data but no batch was given")
    stats.counters = {k: v for k, v in counters.items() if k != "reduce"}
    return stats, counters
