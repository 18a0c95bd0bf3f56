"""Per-batch cost of folding gradients into the statistics vs a plain loop's `.grad += g`, one thread.

    python scripts/bench_fold.py [--model smollm2|tinyllama-4l]

Isolates the only work our calibration adds to a forward+backward (a deterministic number on a machine
whose wall-clock ratios are swamped by other jobs): for every target tensor of the model's shape, the
library's `GradStats.fold` (the finiteness check and the fisher fold, `addcmul_` into fp32 sums),
against the AccumulateGrad add a plain loop does from its second batch on. Best of 5,
torch.set_num_threads(1).
"""

from __future__ import annotations

import argparse
import time

import torch

from llm_gradprune.calibration.stats import GradStats

SHAPES = {
    "smollm2": (30, 576, 192, 1536),
    "tinyllama-4l": (4, 2048, 256, 5632),
}


def best(fn, n=5):
    out = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers, h, kv, i = SHAPES[args.model]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * layers
    dtype = getattr(torch, args.dtype)
    g = [torch.randn(s).to(dtype) for s in shapes]
    names = [f"t{k}.weight" for k in range(len(shapes))]
    # the library's own accumulator: fp32 sums of g^2 (fisher), whatever the model's dtype
    stats = GradStats(
        {n: torch.empty(s, dtype=dtype) for n, s in zip(names, shapes, strict=True)}, {"grad_sq_sum"}
    )
    grad = [torch.zeros(s, dtype=dtype) for s in shapes]

    def naive():
        for x, y in zip(g, grad, strict=True):
            y.add_(x)

    def ours():
        for n, x in zip(names, g, strict=True):
            stats.fold(n, x)  # what each gradient's hook ends in: the finiteness check, then the fold

    n = sum(x.numel() for x in g)
    tn, to = best(naive), best(ours)
    print(f"{args.model} {args.dtype}: {len(shapes)} tensors, {n / 1e6:.1f} M weights; per batch: plain .grad += g "
          f"{tn * 1e3:.1f} ms, ours (check + fold) {to * 1e3:.1f} ms, extra {1e3 * (to - tn):.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
