"""Per-batch cost of folding gradients into the statistics vs a plain loop's `.grad += g`, one thread.

    PYTHONPATH=$PWD python scripts/bench_fold.py [--model smollm2|tinyllama-4l]

Isolates the only work our calibration adds to a forward+backward (a deterministic number on a machine
whose wall-clock ratios are swamped by other jobs): for every target tensor of the model's shape, the
finiteness check and the fisher fold (`addcmul_`), against the AccumulateGrad add a plain loop does from
its second batch on. Best of 5, torch.set_num_threads(1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llm_gradprune.calibration.stats import _all_finite  # noqa: E402

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
    acc = [torch.zeros(s) for s in shapes]  # statistics are fp32 whatever the model's dtype
    grad = [torch.zeros(s, dtype=dtype) for s in shapes]
    scratch = torch.empty(max(x.numel() for x in g))

    def naive():
        for x, y in zip(g, grad, strict=True):
            y.add_(x)

    def ours():
        for x, a in zip(g, acc, strict=True):
            if x.dtype != torch.float32:  # as GradStats.fold does: into a reused fp32 buffer
                x = scratch[: x.numel()].view(x.shape).copy_(x)
            _all_finite(x)
            a.addcmul_(x, x)

    n = sum(x.numel() for x in g)
    tn, to = best(naive), best(ours)
    print(f"{args.model} {args.dtype}: {len(shapes)} tensors, {n / 1e6:.1f} M weights; per batch: plain .grad += g "
          f"{tn * 1e3:.1f} ms, ours (check + fold) {to * 1e3:.1f} ms, extra {1e3 * (to - tn):.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
