"""Scores + thresholds -> boolean prune-masks (True = set to zero), and applying them in place.

Masks are produced one tensor at a time (`iter_masks`) so a caller can apply and free each before the
next is built. The global scope needs every score twice (two radix passes) and once more for its
masks; scores are recomputed from `score_fn` each time rather than stored, trading cheap elementwise
maths for never holding a second model-sized tensor. With `scores_dir` the global scope instead writes
each tensor's scores once to disk (`scorestore.ScoreStore`) and reads them back chunk by chunk, so its
memory stays at one chunk whatever the model's size and the score function runs once per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .scorestore import ScoreStore
from .select import flat_chunks, kth_threshold, nm_mask, num_to_prune, row_mask, tensor_mask, threshold_masks

ScoreFn = Callable[[str], torch.Tensor]


def iter_masks(
    names: list[str],
    score_fn: ScoreFn,
    *,
    scope: str,
    sparsity: float | dict[str, float],
    nm: tuple[int, int] | None = None,
    chunk_elems: int = 1 << 24,
    shapes: dict[str, torch.Size] | None = None,
    scores_dir: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, mask) for each target, pruning exactly the count the scope and pattern ask for.

    `sparsity` may be one float or a per-tensor dict (non-uniform allocation; not with the global scope).
    `shapes` (of the named tensors) is needed only by the global scope; `scores_dir` (global scope
    only) is a folder under which the scores are held on disk during selection.
    """
    per = sparsity if isinstance(sparsity, dict) else dict.fromkeys(names, sparsity)
    if nm is not None:
        for name in names:
            yield name, nm_mask(score_fn(name), *nm, chunk_elems=chunk_elems)
        return
    if scope == "global":
        if isinstance(sparsity, dict):
            raise ValueError(
                "the global scope takes one sparsity for all targets, not a per-tensor allocation"
            )
        if shapes is None:
            raise ValueError("the global scope needs the shape of every target tensor")
        numel = {n: shapes[n].numel() for n in names}
        k = num_to_prune(sparsity, sum(numel[n] for n in names))
        if scores_dir is not None:
            yield from _global_on_disk(names, score_fn, k, chunk_elems, shapes, scores_dir)
            return

        def all_chunks():
            for name in names:
                yield from flat_chunks(score_fn(name), chunk_elems)

        thr = kth_threshold(all_chunks, k)
        # One threshold, one tie quota shared in target order: feed the chunks tensor by tensor.
        stream = threshold_masks(all_chunks(), thr)
        for name in names:
            n_chunks = -(-numel[name] // chunk_elems)
            parts = [next(stream) for _ in range(n_chunks)]
            yield name, torch.cat(parts).view(shapes[name])
        return
    select = {"tensor": tensor_mask, "row": row_mask}.get(scope)
    if select is None:
        raise ValueError(f"scope {scope!r} is unknown: choose one of tensor, row, global")
    for name in names:
        yield name, select(score_fn(name), per[name], chunk_elems=chunk_elems)


def _global_on_disk(names, score_fn, k, chunk_elems, shapes, scores_dir):
    with ScoreStore(scores_dir, chunk_elems) as store:
        for name in names:
            store.write(name, score_fn(name))
        thr = kth_threshold(store.chunks, k, sample=store.sampler)
        stream = threshold_masks(store.chunks(), thr)
        for name in names:
            n_chunks = -(-shapes[name].numel() // chunk_elems)
            parts = [next(stream) for _ in range(n_chunks)]
            yield name, torch.cat(parts).view(shapes[name])


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the masked entries of `weight` in place."""
    weight.masked_fill_(mask.view(weight.shape).to(weight.device), 0)


def mask_summary(mask: torch.Tensor, nm: tuple[int, int] | None = None) -> dict[str, int]:
    out = {"numel": mask.numel(), "masked": int(mask.sum())}
    if nm is not None:
        n, m = nm
        groups = mask.reshape(mask.shape[0], -1).reshape(-1, m)
        out["nm_groups_valid"] = int(((m - groups.sum(-1)) <= n).all())
    return out
