"""Collectives for several processes, and the three ways a run spreads over them.

A `Collective` is what an executor hands the shared pruning steps: `Collective()` for one process or a
replicated model (every rank holds every weight; sums are added across ranks once), `RowShards()` for a
model sharded by rows with FSDP2 (every rank holds some rows of every weight). Both answer the same
questions: how to sum statistics, how to split a micro-batch, which rows of a weight are local.

Two situations use the collectives:

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
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError


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

    backend = str(dist.get_backend())

    def home(device: torch.device) -> torch.device:
        # NCCL (and kin) reduce device tensors only: CPU-held sums (stats_device=cpu) go through a
        # one-chunk staging buffer on the accelerator
        if device.type == "cpu" and "gloo" not in backend and backend != "mpi":
            return collective_device()
        return device

    def buffer(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if (dtype, device) not in buffers:
            buffers[(dtype, device)] = torch.empty(chunk_elems, dtype=dtype, device=device)
        return buffers[(dtype, device)]

    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("all_reduce_sum_ reduces in place and needs contiguous tensors")
        flat = t.view(-1)
        dev = home(t.device)
        if flat.numel() >= chunk_elems:  # large: reduce in place (or staged), one slice at a time
            if dev != t.device:
                flush()  # the staging buffer is the bucket buffer: empty it first
            for i in range(0, flat.numel(), chunk_elems):
                part = flat[i : i + chunk_elems]
                if dev == t.device:
                    dist.all_reduce(part, op=dist.ReduceOp.SUM)
                else:
                    staged = buffer(t.dtype, dev)[: part.numel()]
                    staged.copy_(part)
                    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
                    part.copy_(staged)
                info["calls"] += 1
            continue
        k = (t.dtype, dev)
        if k != key or fill + flat.numel() > chunk_elems:
            flush()
            key = k
        buffer(t.dtype, dev)
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


def rank_offsets(local: list[int], cumulative: bool) -> list[int]:
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


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a row-sharded tensor, concatenated in rank order, on every rank (where
    `local` is). Ranks may hold different numbers of rows (FSDP2 pads the last shards, not the data)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return local
    home = collective_device()
    counts = torch.zeros(size, dtype=torch.int64, device=home)
    counts[rank] = local.shape[0]
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    rows = counts.tolist()
    padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=home)
    padded[: local.shape[0]].copy_(local)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)]).to(local.device)


def split_piece(batch: Any, rank: int, size: int) -> tuple[Any, int, int]:
    """(this rank's piece, its block count, the micro-batch's block count): contiguous, sizes differ by <= 1."""
    if isinstance(batch, torch.Tensor):
        part = torch.tensor_split(batch, size)[rank]
        return part, len(part), len(batch)
    if isinstance(batch, dict):
        n = len(next(iter(batch.values())))
        parts = {k: torch.tensor_split(v, size)[rank] for k, v in batch.items()}
        return parts, len(next(iter(parts.values()))), n
    raise TypeError(f"sharded calibration splits tensors or dicts of tensors, not {type(batch).__name__}")


def _first_block(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    return {k: v[:1] for k, v in batch.items()}


def default_threads() -> int:
    """Every core this process may use, shared among the processes launched on this machine."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local, 1))


class Collective:
    """One process, or a replicated model over a process group (data sharded by whole micro-batches).

    Every rank holds every weight and folds its own micro-batches; sums and counters are added across
    ranks once. With one process every operation is the identity.
    """

    sharding: str | None = None
    rows_sharded = False  # statistics and weights hold this rank's rows only
    splits_batches = False  # every rank sees every micro-batch and takes a piece of it

    @property
    def rank(self) -> int:
        return world()[0]

    @property
    def processes(self) -> int:
        return world()[1]

    def sum_(self, tensors: Iterable[torch.Tensor], chunk_elems: int = 1 << 22) -> dict[str, float]:
        return all_reduce_sum_(tensors, chunk_elems)

    def sum_scalars(self, values: list[float], op: str = "sum") -> list[float]:
        return all_reduce_scalars(values, op)

    def sum_counts_(self, hist: torch.Tensor) -> None:
        hist_all_reduce(hist)

    def piece(self, batch: Any) -> tuple[Any, float]:
        """(what this rank runs of a micro-batch, its share of the micro-batch's blocks)."""
        return batch, 1.0

    def grad_scale(self, share: float) -> float:
        return 1.0

    def agree(self, finite: list[bool]) -> list[bool]:
        """Every rank's verdict on a list of "this gradient is finite" flags (each rank its own here)."""
        return finite

    def local(self, p: torch.Tensor, name: str = "parameter") -> torch.Tensor:
        return p.data

    def owners(self, sizes: dict[str, int]) -> dict[str, int]:
        """Which rank solves each tensor of a layer-wise group: the largest first, each to the rank with
        the least work so far (ties: the lower rank), the same on every rank."""
        load = [0] * self.processes
        out = {}
        for name in sorted(sizes, key=lambda n: (-sizes[n], list(sizes).index(n))):
            rank = min(range(self.processes), key=lambda r: (load[r], r))
            out[name] = rank
            load[rank] += sizes[name]
        return out

    def share_(self, tensors: dict[str, torch.Tensor], owners: dict[str, int]) -> None:
        """Every rank gets each tensor as its owner holds it (in place)."""
        if self.processes == 1:
            return
        import torch.distributed as dist

        for name, t in tensors.items():
            buf = t if t.is_contiguous() and t.dtype != torch.bool else t.contiguous().to(
                torch.uint8 if t.dtype == torch.bool else t.dtype)  # fmt: skip
            dist.broadcast(buf, src=owners[name])
            if buf is not t:
                t.copy_(buf.to(t.dtype))

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if self.processes == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.processes
        dist.all_gather_object(out, obj)
        return out


class RowShards(Collective):
    """A model sharded by rows (FSDP2): every rank takes a piece of the *same* micro-batch.

    FSDP reduce-scatters gradients, averaging them over ranks, so ranks must not work on different
    micro-batches (the average of two micro-batch gradients is not a per-micro-batch sample). Rank r
    runs blocks `tensor_split(batch, world)[r]` with loss scaled by world * n_r / B: FSDP's average is
    then the gradient of the micro-batch's mean loss, exactly the sample one process folds in, already
    split by rows. A rank whose piece is empty (B < world) runs the first block with loss weight 0 so
    the collectives still match, and records no activations for it.
    """

    sharding = "fsdp2"
    rows_sharded = True
    splits_batches = True

    def piece(self, batch: Any) -> tuple[Any, float]:
        rank, size = world()
        part, n_r, n_all = split_piece(batch, rank, size)
        if n_r == 0:
            return _first_block(batch), 0.0  # keeps the collectives in step; contributes nothing
        return part, n_r / n_all

    def grad_scale(self, share: float) -> float:
        return world()[1] * share  # FSDP averages over ranks: undo it, weigh by blocks

    def agree(self, finite: list[bool]) -> list[bool]:
        """A row shard of a gradient is skipped on every rank when any rank saw a non-finite value in it,
        so all shards of a tensor average over the same micro-batches."""
        bad = all_reduce_scalars([float(not f) for f in finite], "max")
        return [b == 0 for b in bad]

    def local(self, p: torch.Tensor, name: str = "parameter") -> torch.Tensor:
        return local_rows(p, name)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def collective_for(model: torch.nn.Module) -> Collective:
    """RowShards for a model whose parameters are DTensors (FSDP2), else the replicated collective."""
    return RowShards() if is_sharded(model) else Collective()
