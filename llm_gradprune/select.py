"""Exact k-th selection, in chunks, with deterministic ties.

Every selection prunes *exactly* k = round_half_up(sparsity * group size) scores per group, and when
several scores equal the threshold the ones met first in traversal order (row-major within a tensor,
tensors in target order) are pruned first. So the count is exact even on the heavily tied scores of a
quantized model, and two runs always agree.

Unstructured thresholds over a tensor or over all targets use a two-pass radix select on the fp32 bit
pattern (65,536-bin histograms of the high then the low 16 bits of an order-preserving integer key):
time linear in the number of scores, memory bounded by the chunk size, no size limit (unlike
`torch.quantile`, which refuses more than 2^24 elements) and no concatenation of all scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

BINS = 1 << 16
ChunkSource = Callable[[], Iterable[torch.Tensor]]


def num_to_prune(sparsity: float, size: int) -> int:
    """round(sparsity * size), halves rounded up, so the same rule holds for every group."""
    return min(size, int(math.floor(sparsity * size + 0.5)))


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map fp32 scores to int64 keys in [0, 2^32) with the same order (-0.0 counts as +0.0)."""
    x = scores.detach().reshape(-1).to(torch.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
    if torch.isnan(x).any():
        raise ValueError("scores contain NaN: check the model weights and calibration statistics")
    bits = x.view(torch.int32).to(torch.int64)
    # Negative floats order backwards in two's complement: flip their magnitude bits.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits + (1 << 31)


def keys_to_float(key: int) -> float:
    bits = key - (1 << 31)
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


@dataclass(frozen=True)
class Threshold:
    """Prune every score with key < `key`, plus the first `ties` scores whose key == `key`."""

    key: int
    ties: int
    k: int

    @property
    def value(self) -> float:
        return keys_to_float(self.key)


def _pick_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest (1-based) and how many lie in earlier bins."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, before


def kth_threshold(
    chunks: ChunkSource, k: int, reduce: Callable[[torch.Tensor], None] | None = None
) -> Threshold | None:
    """Exact threshold pruning the k smallest scores of all chunks; None when k == 0.

    `chunks` is called twice and must yield the same chunks in the same order each time. `reduce`
    (optional) sums each histogram in place across processes that each hold part of the scores
    (`distributed.hist_all_reduce`): the threshold is then the one over all processes' scores.
    """
    if k <= 0:
        return None
    hist = torch.zeros(BINS, dtype=torch.int64)
    for c in chunks():
        keys = order_keys(c)
        hist += torch.bincount(keys >> 16, minlength=BINS).cpu()
    if reduce is not None:
        reduce(hist)
    total = int(hist.sum())
    if k > total:
        raise ValueError(f"cannot prune {k} of {total} scores")
    high, before_high = _pick_bin(hist, k)
    hist.zero_()
    for c in chunks():
        keys = order_keys(c)
        keys = keys[(keys >> 16) == high]
        hist += torch.bincount(keys & 0xFFFF, minlength=BINS).cpu()
    if reduce is not None:
        reduce(hist)
    low, before_low = _pick_bin(hist, k - before_high)
    less = before_high + before_low
    return Threshold(key=(high << 16) | low, ties=k - less, k=k)


def threshold_masks(chunks: Iterable[torch.Tensor], thr: Threshold | None) -> Iterator[torch.Tensor]:
    """Bool prune-masks for the chunks (same order as for `kth_threshold`), sharing the tie quota."""
    left = thr.ties if thr is not None else 0
    for c in chunks:
        if thr is None:
            yield torch.zeros(c.shape, dtype=torch.bool, device=c.device)
            continue
        keys = order_keys(c).view(c.shape)
        mask = keys < thr.key
        if left > 0:
            eq = (keys == thr.key).reshape(-1)
            take = eq & (torch.cumsum(eq, 0) <= left)
            left -= int(take.sum())
            mask |= take.view(c.shape)
        yield mask


def flat_chunks(scores: torch.Tensor, chunk_elems: int) -> list[torch.Tensor]:
    flat = scores.reshape(-1)
    return [flat[i : i + chunk_elems] for i in range(0, flat.numel(), chunk_elems)]


def tensor_mask(scores: torch.Tensor, sparsity: float, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Prune the round(sparsity * numel) lowest scores of one tensor."""
    chunks = flat_chunks(scores, chunk_elems)
    thr = kth_threshold(lambda: chunks, num_to_prune(sparsity, scores.numel()))
    return torch.cat(list(threshold_masks(chunks, thr))).view(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Prune the round(sparsity * row length) lowest scores in every output row."""
    s2 = scores.reshape(scores.shape[0], -1)
    rows, cols = s2.shape
    k = num_to_prune(sparsity, cols)
    mask = torch.zeros(s2.shape, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask.view(scores.shape)
    step = max(1, chunk_elems // cols)
    for r in range(0, rows, step):
        s = s2[r : r + step].to(torch.float32) + 0.0
        if torch.isnan(s).any():
            raise ValueError("scores contain NaN: check the model weights and calibration statistics")
        kth = torch.kthvalue(s, k, dim=1, keepdim=True).values
        less = s < kth
        eq = s == kth
        need = k - less.sum(dim=1, keepdim=True)
        mask[r : r + step] = less | (eq & (torch.cumsum(eq, dim=1) <= need))
    return mask.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Keep the n highest of every m consecutive input weights of each row (prune m - n of each group)."""
    s2 = scores.reshape(scores.shape[0], -1)
    rows, cols = s2.shape
    if cols % m:
        raise ValueError(
            f"pattern {n}:{m} needs rows whose length divides by {m}; this tensor's rows have {cols}"
        )
    mask = torch.zeros(s2.shape, dtype=torch.bool, device=scores.device)
    step = max(1, chunk_elems // cols)
    for r in range(0, rows, step):
        g = s2[r : r + step].to(torch.float32).reshape(-1, cols // m, m)
        if torch.isnan(g).any():
            raise ValueError("scores contain NaN: check the model weights and calibration statistics")
        order = torch.sort(g, dim=-1, stable=True).indices[..., : m - n]
        grouped = torch.zeros(g.shape, dtype=torch.bool, device=g.device).scatter_(-1, order, True)
        mask[r : r + step] = grouped.view(-1, cols)
    return mask.view(scores.shape)
