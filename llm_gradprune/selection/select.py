"""Exact k-th selection, in chunks, with deterministic ties.

Every selection prunes *exactly* k = round_half_up(sparsity * group size) scores per group, and when
several scores equal the threshold the ones met first in traversal order (row-major within a tensor,
tensors in target order) are pruned first. So the count is exact even on the heavily tied scores of a
quantized model, and two runs always agree.

Unstructured thresholds over a tensor or over all targets are found without sorting and without ever
holding more than one chunk of scores (no size limit, unlike `torch.quantile`, which refuses more than
2^24 elements):

1. a seeded uniform sample of at most `SAMPLE_CAP` scores (taken while the chunks stream by, or while
   the scores are written to disk) brackets the k-th score between two sample order statistics;
2. one pass over the chunks counts the scores below the bracket and histograms the order-preserving
   integer keys (fp32 bit patterns) of the few inside it; when the bracket spans at most 2^20 keys,
   as it does for any smooth distribution, that histogram gives the exact k-th key at once.

The sample only decides how fast this is, never the answer: a bracket that misses the k-th score, or
spans too many keys, is refined by further histogram passes over the remaining key range (with the full
range this is a plain radix select), so the result is exact for any data, ties and infinities included.
Time is linear in the number of scores; memory is one chunk plus the sample and a 2^20-bin histogram.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

BINS = 1 << 16  # kept for callers of the previous radix version
HIST_BITS = 20  # one refinement histogram has at most 2^20 bins (8 MB)
SAMPLE_CAP = 1 << 20  # scores kept in the bracketing sample (4 MB)
SAMPLE_Z = 6.0  # bracket half-width in standard deviations of the sample rank: misses ~1e-9
ChunkSource = Callable[[], Iterable[torch.Tensor]]

_NAN_MSG = "scores contain NaN: check the model weights and calibration statistics"


def num_to_prune(sparsity: float, size: int) -> int:
    """round(sparsity * size), halves rounded up, so the same rule holds for every group."""
    return min(size, int(math.floor(sparsity * size + 0.5)))


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map fp32 scores to int64 keys in [0, 2^32) with the same order (-0.0 counts as +0.0)."""
    x = scores.detach().reshape(-1).to(torch.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
    if torch.isnan(x).any():
        raise ValueError(_NAN_MSG)
    bits = x.view(torch.int32).to(torch.int64)
    # Negative floats order backwards in two's complement: flip their magnitude bits.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits + (1 << 31)


def float_to_key(value: float) -> int:
    return int(order_keys(torch.tensor([value], dtype=torch.float32))[0])


def keys_to_float(key: int) -> float:
    bits = key - (1 << 31)
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


KEY_MIN = float_to_key(float("-inf"))  # keys outside [KEY_MIN, KEY_MAX] are NaN bit patterns
KEY_MAX = float_to_key(float("inf"))
_KEY_NEG_ZERO = (1 << 31) - 1  # the key -0.0 would have; never produced, since -0.0 maps to +0.0


@dataclass(frozen=True)
class Threshold:
    """Prune every score with key < `key`, plus the first `ties` scores whose key == `key`."""

    key: int
    ties: int
    k: int

    @property
    def value(self) -> float:
        return keys_to_float(self.key)


def _flat32(c: torch.Tensor) -> torch.Tensor:
    return c.detach().reshape(-1).to(torch.float32)


class Sampler:
    """A seeded, uniform sample (with replacement) of at most `cap` values from a stream of chunks.

    Each chunk contributes floor(numel * rate + u) random positions (u uniform, so small tensors are
    not under-counted); when the sample would pass `cap`, every second kept value is dropped and the
    rate halves. The sample depends only on the seed and the chunk sizes, so two runs agree.
    """

    def __init__(self, cap: int = SAMPLE_CAP, seed: int = 0):
        self.cap, self.rate, self.total, self.size = cap, 1.0, 0, 0
        self.parts: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, chunk: torch.Tensor) -> None:
        flat = chunk.detach().reshape(-1)
        n = flat.numel()
        self.total += n
        while self.size + n * self.rate > self.cap:
            self.parts = [p[::2].clone() for p in self.parts]
            self.size = sum(p.numel() for p in self.parts)
            self.rate /= 2
        if self.rate == 1.0:
            part = flat.to(device="cpu", dtype=torch.float32, copy=True)
        else:
            u = float(torch.rand((), generator=self.gen))
            m = int(math.floor(n * self.rate + u))
            idx = torch.randint(n, (m,), generator=self.gen)
            part = flat[idx.to(flat.device)].to(device="cpu", dtype=torch.float32)
        self.parts.append(part)
        self.size += part.numel()

    @property
    def exhaustive(self) -> bool:
        """True when the sample is every value seen, in order."""
        return self.rate == 1.0

    def values(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.empty(0)


def _pick_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest (1-based) and how many lie in earlier bins."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype)).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, before


def _bracket(sample: torch.Tensor, k: int, total: int) -> tuple[int, int]:
    """Key range that holds the k-th of `total` scores with overwhelming probability."""
    m = sample.numel()
    if m == 0:
        return KEY_MIN, KEY_MAX
    if torch.isnan(sample).any():
        raise ValueError(_NAN_MSG)
    p = k / total
    r = p * m
    d = SAMPLE_Z * math.sqrt(m * p * (1.0 - p)) + 1.0
    lo, hi = math.floor(r - d), math.ceil(r + d)
    key_lo = KEY_MIN if lo < 1 else float_to_key(torch.kthvalue(sample, lo).values.item())
    key_hi = KEY_MAX if hi > m else float_to_key(torch.kthvalue(sample, hi).values.item())
    return key_lo, key_hi


def _bound(key: int, upper: bool) -> float:
    """Float with the same comparisons as `key` over real scores (skips the phantom -0.0 key)."""
    if key == _KEY_NEG_ZERO:
        key = key - 1 if upper else key + 1
    return keys_to_float(key)


def _range_pass(chunks: ChunkSource, key_lo: int, key_hi: int, shift: int) -> tuple[int, torch.Tensor, int]:
    """(scores below key_lo, histogram of (key - key_lo) >> shift for keys in [key_lo, key_hi], total)."""
    lo_f, hi_f = _bound(key_lo, upper=False), _bound(key_hi, upper=True)
    full = key_lo <= KEY_MIN and key_hi >= KEY_MAX
    hist = torch.zeros(((key_hi - key_lo) >> shift) + 1, dtype=torch.int64)
    below = total = n_pending = 0
    pending: list[torch.Tensor] = []
    for c in chunks():
        f = _flat32(c)
        total += f.numel()
        if full:
            band = f
            if torch.isnan(f).any():
                raise ValueError(_NAN_MSG)
        else:
            ge = f >= lo_f
            n_lt = int(torch.count_nonzero(f < lo_f))
            if n_lt + int(torch.count_nonzero(ge)) != f.numel():  # NaN fails both comparisons
                raise ValueError(_NAN_MSG)
            below += n_lt
            band = f[ge.logical_and_(f <= hi_f)]
        if band.numel():
            # buffer the band's keys: one bincount per histogram's worth, not one per (small) chunk
            pending.append(((order_keys(band) - key_lo) >> shift).cpu())
            n_pending += band.numel()
            if n_pending >= hist.numel():
                hist += torch.bincount(torch.cat(pending), minlength=hist.numel())
                pending, n_pending = [], 0
    if pending:
        hist += torch.bincount(torch.cat(pending), minlength=hist.numel())
    return below, hist, total


def kth_threshold(
    chunks: ChunkSource,
    k: int,
    *,
    sample: Sampler | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> Threshold | None:
    """Exact threshold pruning the k smallest scores of all chunks; None when k == 0.

    `chunks` is called two or more times and must yield the same chunks in the same order each time.
    `sample`, if given, is a `Sampler` already fed with every chunk (e.g. while the scores were written),
    which saves the sampling pass. `reduce` (optional) sums a count tensor in place across processes
    that each hold part of the scores (`distributed.hist_all_reduce`): the threshold is then the one
    over all processes' scores.
    """
    if k <= 0:
        return None
    if reduce is not None:
        return _kth_threshold_reduced(chunks, k, reduce)
    if sample is None:
        sample = Sampler()
        for c in chunks():
            sample.add(c)
    total = sample.total
    if k > total:
        raise ValueError(f"cannot prune {k} of {total} scores")
    values = sample.values()
    if sample.exhaustive:  # every score is in memory already: no pass needed
        if torch.isnan(values).any():
            raise ValueError(_NAN_MSG)
        v = torch.kthvalue(values, k).values
        less = int(torch.count_nonzero(values < v))
        return Threshold(key=float_to_key(v.item()), ties=k - less, k=k)
    key_lo, key_hi = _bracket(values, k, total)
    below_lo = 0  # scores known to lie below key_lo before a pass (recounted by every pass)
    while True:
        shift = max(0, (key_hi - key_lo + 1).bit_length() - HIST_BITS)
        below, hist, seen = _range_pass(chunks, key_lo, key_hi, shift)
        if seen != total:
            raise ValueError(f"chunks changed between passes: {seen} scores, then {total}")
        inside = int(hist.sum())
        if k <= below:  # bracket missed low: everything below it
            key_hi, key_lo = key_lo - 1, KEY_MIN
            continue
        if k > below + inside:  # bracket missed high: everything above it
            key_lo, key_hi = key_hi + 1, KEY_MAX
            continue
        b, before = _pick_bin(hist, k - below)
        below_lo = below + before
        if shift == 0:
            return Threshold(key=key_lo + b, ties=k - below_lo, k=k)
        key_lo, key_hi = key_lo + (b << shift), min(key_hi, key_lo + ((b + 1) << shift) - 1)


def _kth_threshold_reduced(chunks: ChunkSource, k: int, reduce: Callable[[torch.Tensor], None]) -> Threshold:
    """Histogram passes over the full key range whose counts are summed across processes.

    No sample is used, so every rank takes the same refinement path; two passes (2^20 bins, then the
    remaining 2^12 keys) find the exact key.
    """
    key_lo, key_hi = KEY_MIN, KEY_MAX
    while True:
        shift = max(0, (key_hi - key_lo + 1).bit_length() - HIST_BITS)
        below, hist, seen = _range_pass(chunks, key_lo, key_hi, shift)
        packed = torch.cat([hist, torch.tensor([below, seen], dtype=torch.int64)])
        reduce(packed)
        hist, below, total = packed[:-2], int(packed[-2]), int(packed[-1])
        if k > total:
            raise ValueError(f"cannot prune {k} of {total} scores")
        b, before = _pick_bin(hist, k - below)
        if shift == 0:
            return Threshold(key=key_lo + b, ties=k - below - before, k=k)
        key_lo, key_hi = key_lo + (b << shift), min(key_hi, key_lo + ((b + 1) << shift) - 1)


def threshold_masks(chunks: Iterable[torch.Tensor], thr: Threshold | None) -> Iterator[torch.Tensor]:
    """Bool prune-masks for the chunks (same order as for `kth_threshold`), sharing the tie quota."""
    left = thr.ties if thr is not None else 0
    value = thr.value if thr is not None else 0.0
    for c in chunks:
        if thr is None:
            yield torch.zeros(c.shape, dtype=torch.bool, device=c.device)
            continue
        f = c.detach().to(torch.float32)  # float compares treat -0.0 == +0.0, as the keys do
        mask = f < value
        if left > 0:
            eq = f == value
            n_eq = int(torch.count_nonzero(eq))
            if n_eq <= left:
                mask |= eq
                left -= n_eq
            elif n_eq:
                first = eq.reshape(-1).nonzero().squeeze(1)[:left]
                mask.view(-1)[first] = True
                left = 0
        yield mask


def flat_chunks(scores: torch.Tensor, chunk_elems: int) -> list[torch.Tensor]:
    flat = scores.reshape(-1)
    return [flat[i : i + chunk_elems] for i in range(0, flat.numel(), chunk_elems)]


def tensor_mask(scores: torch.Tensor, sparsity: float, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Prune the round(sparsity * numel) lowest scores of one tensor."""
    chunks = flat_chunks(scores, chunk_elems)
    thr = kth_threshold(lambda: chunks, num_to_prune(sparsity, scores.numel()))
    mask = torch.empty(scores.numel(), dtype=torch.bool, device=scores.device)
    i = 0
    for part in threshold_masks(chunks, thr):
        mask[i : i + part.numel()] = part
        i += part.numel()
    return mask.view(scores.shape)


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
            raise ValueError(_NAN_MSG)
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
            raise ValueError(_NAN_MSG)
        order = torch.sort(g, dim=-1, stable=True).indices[..., : m - n]
        grouped = torch.zeros(g.shape, dtype=torch.bool, device=g.device).scatter_(-1, order, True)
        mask[r : r + step] = grouped.view(-1, cols)
    return mask.view(scores.shape)
