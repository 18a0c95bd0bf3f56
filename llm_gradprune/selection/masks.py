"""Scores + budgets -> boolean prune-masks (True = set to zero), one tensor at a time, and applying them.

A scope says which weights compete for the same budget:

- `tensor`: each matrix prunes round(s x its size) of its lowest scores;
- `row`: each output row prunes round(s x row length) (as Wanda does);
- `global`: one threshold over all targets. It is turned into per-tensor counts first
  (`global_sparsities`: the exact global selection, counted per tensor, never applied), and each
  tensor then prunes its own lowest scores with its count. That gives exactly the global mask (ties
  included: the first ties in traversal order fall in the earlier tensors either way), and it lets a
  plan see every tensor's count before any weight changes, and a layer-wise run prune block by block.

An N:M pattern replaces the scope: keep N of every M consecutive input weights of each row.

With rows sharded over processes (FSDP2) every rank scores only its rows: exact thresholds come from
radix histograms summed across ranks, and ties are split in the global order (tensor by tensor, rank
0's rows first) from per-rank tie counts (`parallel.rank_offsets`). No rank holds another's scores.

With `scores_dir` the global scope writes each tensor's scores once to disk (`scorestore.ScoreStore`)
and reads them back chunk by chunk, so its memory stays at one chunk whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..parallel import Collective, rank_offsets
from ..registry import Registry
from .scorestore import ScoreStore
from .select import (
    Threshold,
    flat_chunks,
    kth_threshold,
    nm_mask,
    num_to_prune,
    order_keys,
    row_mask,
    tensor_mask,
    threshold_masks,
)

ScoreFn = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Scope:
    name: str
    help: str
    per_tensor_budget: bool  # False: the budget is shared by all targets (resolved to per-tensor counts)


SCOPES: Registry[Scope] = Registry("scope")
for _scope in (
    Scope("tensor", "each matrix prunes round(s x its size) of its lowest scores", True),
    Scope("row", "each output row prunes round(s x row length) of its lowest scores", True),
    Scope("global", "one threshold over all targets (exact per-tensor counts, then per-tensor masks)", False),
):
    SCOPES.add(_scope.name, _scope)


def _sharded_tensor_mask(scores: torch.Tensor, sparsity: float, numel: int, chunk_elems: int, collective):
    chunks = flat_chunks(scores, chunk_elems)
    thr = kth_threshold(lambda: chunks, num_to_prune(sparsity, numel), reduce=collective.sum_counts_)
    before = rank_offsets([_tie_count(chunks, thr.key) if thr else 0], cumulative=False)[0]
    return _mask_of(chunks, _shifted(thr, before), scores.shape)


def select_mask(
    scores: torch.Tensor,
    *,
    scope: str,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    chunk_elems: int = 1 << 24,
    numel: int | None = None,
    collective: Collective | None = None,
) -> torch.Tensor:
    """The mask of one tensor (this rank's rows when rows are sharded; `numel` is then the global size)."""
    if nm is not None:
        return nm_mask(scores, *nm, chunk_elems=chunk_elems)
    if scope == "row":  # a row sharding keeps every row whole on one rank: nothing to share
        return row_mask(scores, sparsity, chunk_elems=chunk_elems)
    if scope == "tensor":
        if collective is not None and collective.rows_sharded:
            return _sharded_tensor_mask(scores, sparsity, numel or scores.numel(), chunk_elems, collective)
        return tensor_mask(scores, sparsity, chunk_elems=chunk_elems)
    SCOPES.get(scope)  # an unknown name fails here with the list of known ones
    raise ValueError(f"scope {scope!r} takes per-tensor budgets: resolve it with global_sparsities first")


def global_sparsities(
    names: list[str],
    score_fn: ScoreFn,
    *,
    sparsity: float,
    numel: dict[str, int],
    chunk_elems: int = 1 << 24,
    scores_dir: str | None = None,
    collective: Collective | None = None,
) -> dict[str, float]:
    """Per-tensor sparsity k_t / n_t, where k_t is how many of tensor t's weights the exact global
    selection over all targets prunes. `numel` holds global sizes (rows of all ranks)."""
    k = num_to_prune(sparsity, sum(numel[n] for n in names))
    sharded = collective is not None and collective.rows_sharded
    if sharded:
        counts = _sharded_global_counts(names, score_fn, k, chunk_elems, collective, scores_dir)
    elif scores_dir is not None:
        counts = _global_counts_on_disk(names, score_fn, k, chunk_elems, numel, scores_dir)
    else:

        def all_chunks():
            for name in names:
                yield from flat_chunks(score_fn(name), chunk_elems)

        thr = kth_threshold(all_chunks, k)
        counts = _count_per_tensor(names, threshold_masks(all_chunks(), thr), numel, chunk_elems)
    return {n: counts[n] / numel[n] for n in names}


def _count_per_tensor(names, stream, numel, chunk_elems) -> dict[str, int]:
    """Masked count per tensor from one stream of chunk masks in target order (one tie quota)."""
    out = {}
    for name in names:
        n_chunks = -(-numel[name] // chunk_elems)
        out[name] = sum(int(next(stream).sum()) for _ in range(n_chunks))
    return out


def _global_counts_on_disk(names, score_fn, k, chunk_elems, numel, scores_dir) -> dict[str, int]:
    with ScoreStore(scores_dir, chunk_elems) as store:
        for name in names:
            store.write(name, score_fn(name))
        thr = kth_threshold(store.chunks, k, sample=store.sampler)
        return _count_per_tensor(names, threshold_masks(store.chunks(), thr), numel, chunk_elems)


def _sharded_global_counts(names, score_fn, k, chunk_elems, collective, scores_dir) -> dict[str, int]:
    """Global counts over row-sharded scores: one reduced threshold, ties split in the global order."""

    def run(chunks_of) -> dict[str, int]:
        def all_chunks():
            for name in names:
                yield from chunks_of(name)

        thr = kth_threshold(all_chunks, k, reduce=collective.sum_counts_)
        ties = [_tie_count(chunks_of(n), thr.key) if thr else 0 for n in names]
        before = rank_offsets(ties, cumulative=True)
        local = [
            int(sum(int(m.sum()) for m in threshold_masks(chunks_of(n), _shifted(thr, b))))
            for n, b in zip(names, before, strict=True)
        ]
        total = collective.sum_scalars([float(c) for c in local])
        return {n: int(c) for n, c in zip(names, total, strict=True)}

    if scores_dir is None:
        return run(lambda name: flat_chunks(score_fn(name), chunk_elems))
    with ScoreStore(scores_dir, chunk_elems) as store:  # a fresh folder per rank
        for name in names:
            store.write(name, score_fn(name))
        return run(store.read_chunks)


def _tie_count(chunks, key: int) -> int:
    return sum(int((order_keys(c) == key).sum()) for c in chunks)


def _shifted(thr: Threshold | None, before: int) -> Threshold | None:
    """The part of the tie quota left for this rank's chunks once `before` ties have been met."""
    if thr is None:
        return None
    return Threshold(key=thr.key, ties=max(0, thr.ties - before), k=thr.k)


def _mask_of(chunks: list[torch.Tensor], thr: Threshold | None, shape: torch.Size) -> torch.Tensor:
    if not chunks:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.cat(list(threshold_masks(chunks, thr))).view(shape)


def iter_masks(
    names: list[str],
    score_fn: ScoreFn,
    *,
    scope: str,
    sparsity: float | dict[str, float],
    nm: tuple[int, int] | None = None,
    chunk_elems: int = 1 << 24,
    numel: dict[str, int] | None = None,
    scores_dir: str | None = None,
    collective: Collective | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, mask) for each target, pruning exactly the count the scope and pattern ask for.

    `sparsity` is one float or a per-tensor dict (not with the global scope, which shares one budget).
    `numel` (global sizes) is needed by the global scope and by sharded rows.
    """
    if nm is None and scope == "global":
        if isinstance(sparsity, dict):
            raise ValueError(
                "the global scope takes one sparsity for all targets, not a per-tensor allocation"
            )
        if numel is None:
            raise ValueError("the global scope needs the size of every target tensor")
        sparsity = global_sparsities(names, score_fn, sparsity=sparsity, numel=numel, chunk_elems=chunk_elems,
                                     scores_dir=scores_dir, collective=collective)  # fmt: skip
        scope = "tensor"
    per = sparsity if isinstance(sparsity, dict) else dict.fromkeys(names, sparsity)
    for name in names:
        yield name, select_mask(score_fn(name), scope=scope, sparsity=per[name], nm=nm, chunk_elems=chunk_elems,
                                numel=None if numel is None else numel[name], collective=collective)  # fmt: skip


def empty_tensors(
    budgets: dict[str, float], shapes: dict[str, tuple[int, int]], scope: str, nm: tuple[int, int] | None
) -> list[str]:
    """Targets whose budget prunes every weight (100%): the plan refuses them unless allowed.

    `shapes` are (rows, row length); the row scope prunes round(s x row length) per row.
    """
    if nm is not None:
        return []
    out = []
    for name, s in budgets.items():
        rows, cols = shapes[name]
        if scope == "row":
            full = num_to_prune(s, cols) == cols
        else:
            full = num_to_prune(s, rows * cols) == rows * cols
        if full and rows * cols:
            out.append(name)
    return out


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the masked entries of `weight` in place."""
    weight.masked_fill_(mask.view(weight.shape).to(weight.device), 0)


def mask_summary(mask: torch.Tensor, nm: tuple[int, int] | None = None) -> dict[str, int]:
    out = {"numel": mask.numel(), "masked": int(mask.sum())}
    if nm is not None:
        n, m = nm
        if mask.numel():
            groups = mask.reshape(mask.shape[0], -1).reshape(-1, m)
            out["nm_groups_valid"] = int(((m - groups.sum(-1)) <= n).all())
        else:
            out["nm_groups_valid"] = 1
    return out
