"""Collectives for several processes: bounded-memory sums and exact selection over sharded scores.

Two situations use them:

* Replicated model, sharded data (any number of processes, no DDP wrapper): every rank folds its own
  micro-batches into local fp32 sums; `all_reduce_sum_` adds them across ranks once at the end. Small
  tensors are packed into one buffer of at most `chunk_elems` elements, large ones are reduced in place
  slice by slice, so the reduction never needs more than one chunk of extra memory however large the
  model is, and the number of collective calls stays small for models with many small tensors.
* Sharded model (FSDP2: every target weight split by rows across ranks): each rank scores only its rows.
  An exact k-th selection over all ranks' scores needs only the 65,536-bin histograms of the radix
  select summed across ranks (`hist_all_reduce`), and the tie quota is split in the global traversal
  order (tensor by tensor, rank 0's rows before rank 1's) from the all-reduced per-rank tie counts
  (`tie_offsets`). No rank ever holds another rank's scores.

Without an initialised process group (or with one process) every function here is the identity, so
the same code runs in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch

from .select import (
    Threshold,
    flat_chunks,
    kth_threshold,
    nm_mask,
    num_to_prune,
    order_keys,
    row_mask,
    threshold_masks,
)


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_accelerator(cpu: bool = False):
    """An `Accelerator` that sees every launched process, also on a machine without accelerators.

    Accelerate 1.x turns `accelerate launch --multi_gpu --num_processes N` on a CPU-only machine into
    N processes that each report DistributedType.NO (process 0 of 1) unless `cpu=True` is passed: all
    of them would calibrate on all the data and write the checkpoint. With `cpu=True` they form one
    MULTI_CPU (gloo) group. So: cpu=True whenever several processes were launched and no accelerator
    device exists.
    """
    import os

    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    has_accel = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    return Accelerator(cpu=cpu or (launched and not has_accel))


def collective_device() -> torch.device:
    """Where small tensors must live for the default backend: the CPU if gloo (or mpi) serves it,
    else the current accelerator (NCCL and its kin reduce device tensors only)."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if "gloo" in backend or backend == "mpi":  # also "cuda:nccl,cpu:gloo": the CPU goes over gloo
        return torch.device("cpu")
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        return torch.device(acc.type, torch.accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum_(tensors: Iterable[torch.Tensor], chunk_elems: int = 1 << 22) -> dict[str, float]:
    """Sum every tensor across ranks in place with at most `chunk_elems` elements of extra memory.

    Returns {"calls", "elements", "seconds"} so the caller can report what the reduction cost.
    """
    import torch.distributed as dist

    tensors = list(tensors)
    start = time.perf_counter()
    info = {"calls": 0, "elements": sum(t.numel() for t in tensors), "seconds": 0.0}
    if world()[1] == 1:
        return info
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems {chunk_elems} must be >= 1")
    buffers: dict[tuple, torch.Tensor] = {}
    pending: list[tuple[torch.Tensor, int]] = []
    fill = 0
    key = None

    def flush() -> None:
        nonlocal fill
        if not pending:
            return
        buf = buffers[key][:fill]
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        info["calls"] += 1
        for t, at in pending:
            t.view(-1).copy_(buf[at : at + t.numel()])
        pending.clear()
        fill = 0

    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("all_reduce_sum_ reduces in place and needs contiguous tensors")
        flat = t.view(-1)
        if flat.numel() >= chunk_elems:  # large: reduce in place, one slice at a time
            for i in range(0, flat.numel(), chunk_elems):
                dist.all_reduce(flat[i : i + chunk_elems], op=dist.ReduceOp.SUM)
                info["calls"] += 1
            continue
        k = (t.dtype, t.device)
        if k != key or fill + flat.numel() > chunk_elems:
            flush()
            key = k
        if k not in buffers:
            buffers[k] = torch.empty(chunk_elems, dtype=t.dtype, device=t.device)
        buffers[k][fill : fill + flat.numel()].copy_(flat)
        pending.append((t, fill))
        fill += flat.numel()
    flush()
    info["seconds"] = time.perf_counter() - start
    return info


def all_reduce_scalars(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max/min) a short list of numbers across ranks, in one float64 collective."""
    import torch.distributed as dist

    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


def hist_all_reduce(hist: torch.Tensor) -> None:
    """Sum a radix-select histogram (int64, on the CPU) across ranks in place."""
    import torch.distributed as dist

    if world()[1] == 1:
        return
    t = hist.to(collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    hist.copy_(t.cpu())


def tie_counts(chunks: Iterable[torch.Tensor], key: int) -> int:
    return sum(int((order_keys(c) == key).sum()) for c in chunks)


def tie_offsets(local: list[int], cumulative: bool) -> list[int]:
    """For each tensor t, the ties met before this rank's rows of t in the global traversal order.

    The order is tensor by tensor, and within a tensor rank 0's rows first (row sharding). With
    `cumulative`, ties of all ranks in earlier tensors count too (one quota shared by all tensors,
    the global scope); without it, each tensor has its own quota (the tensor scope).
    """
    rank, size = world()
    counts = torch.zeros(size, len(local), dtype=torch.float64)
    counts[rank] = torch.tensor(local, dtype=torch.float64)
    if size > 1:
        import torch.distributed as dist

        c = counts.to(collective_device())
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        counts = c.cpu()
    counts = counts.to(torch.int64)
    before_rank = counts[:rank].sum(dim=0)
    if cumulative:
        earlier = torch.cumsum(counts.sum(dim=0), 0) - counts.sum(dim=0)
        before_rank = before_rank + earlier
    return before_rank.tolist()


def _shifted(thr: Threshold | None, before: int) -> Threshold | None:
    """The part of the tie quota left for this rank's chunks once `before` ties have been met."""
    if thr is None:
        return None
    return Threshold(key=thr.key, ties=max(0, thr.ties - before), k=thr.k)


def _mask_of(chunks: list[torch.Tensor], thr: Threshold | None, shape: torch.Size) -> torch.Tensor:
    if not chunks:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.cat(list(threshold_masks(chunks, thr))).view(shape)


def iter_sharded_masks(
    names: list[str],
    score_fn: Callable[[str], torch.Tensor],
    *,
    scope: str,
    sparsity: float,
    numel: dict[str, int],
    nm: tuple[int, int] | None = None,
    chunk_elems: int = 1 << 24,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`masks.iter_masks` for row-sharded tensors: yields (name, mask of this rank's rows).

    `score_fn(name)` returns this rank's rows of the scores; `numel[name]` is the global size. Every
    rank must call this with the same names in the same order (the selections are collective). The
    union of all ranks' masks equals the single-process masks exactly, ties included.
    """
    if nm is not None:
        for name in names:
            yield name, nm_mask(score_fn(name), *nm, chunk_elems=chunk_elems)
        return
    if scope == "row":  # a row sharding keeps every row whole on one rank: nothing to share
        for name in names:
            yield name, row_mask(score_fn(name), sparsity, chunk_elems=chunk_elems)
        return
    if scope == "tensor":
        for name in names:
            scores = score_fn(name)
            chunks = flat_chunks(scores, chunk_elems)
            thr = kth_threshold(
                lambda c=chunks: c, num_to_prune(sparsity, numel[name]), reduce=hist_all_reduce
            )
            before = tie_offsets([tie_counts(chunks, thr.key) if thr else 0], cumulative=False)[0]
            yield name, _mask_of(chunks, _shifted(thr, before), scores.shape)
        return
    if scope != "global":
        raise ValueError(f"scope {scope!r} is unknown: choose one of tensor, row, global")

    def all_chunks():
        for name in names:
            yield from flat_chunks(score_fn(name), chunk_elems)

    thr = kth_threshold(
        all_chunks, num_to_prune(sparsity, sum(numel[n] for n in names)), reduce=hist_all_reduce
    )
    local = [tie_counts(flat_chunks(score_fn(n), chunk_elems), thr.key) if thr else 0 for n in names]
    before = tie_offsets(local, cumulative=True)
    for name, b in zip(names, before, strict=True):
        scores = score_fn(name)
        yield name, _mask_of(flat_chunks(scores, chunk_elems), _shifted(thr, b), scores.shape)
