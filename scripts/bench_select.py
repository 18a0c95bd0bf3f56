"""Benchmark exact selection: one Llama-2-7B MLP weight in memory, and global selection from disk.

    nice -n 10 python scripts/bench_select.py --out bench_select.json [--threads 1]

Part A: one 11008x4096 tensor (45M fp32 scores): torch.kthvalue vs our threshold (`kth_threshold`)
and our full mask (`tensor_mask`), best of --repeats, each in its own process for a clean peak RSS.
Part B: global selection over T tensors of 11008x4096 scores (T = --sizes, default 3, 11, 34, i.e.
0.14, 0.50 and 1.53 billion scores), generated chunk by chunk with a fixed seed and written to disk
during "scoring" (`ScoreStore`), then thresholded and masked from disk, in a fresh process per size
(peak RSS via resource.getrusage). torch.kthvalue runs on the same data where it fits (the smallest
size). Thresholds must be identical; at every size the mask pass also re-counts, independently of the
threshold search, that #(s < v) < k <= #(s <= v) and that exactly k scores are masked.
Scores are log-normal with a different location per tensor (like w^2 * E[g^2] across layers).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

ROWS, COLS = 11008, 4096
SPARSITY = 0.5


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def tensor_chunks(t: int, chunk: int, seed: int):
    """Tensor t's scores in chunks: exp(2 * N(0,1) + t % 7 - 3), each chunk from its own seed."""
    n = ROWS * COLS
    for j, i in enumerate(range(0, n, chunk)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + t * 1009 + j)
        yield torch.randn(min(chunk, n - i), generator=g).mul_(2.0).add_(t % 7 - 3).exp_()


def one_tensor(seed: int) -> torch.Tensor:
    return torch.cat(list(tensor_chunks(0, 1 << 24, seed))).view(ROWS, COLS)


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# -- workers (each runs in its own process) ------------------------------------------------------
def work_tensor(args) -> dict:
    from llm_gradprune.selection.select import flat_chunks, kth_threshold, num_to_prune, tensor_mask

    s = one_tensor(args.seed)
    base = peak_rss_mb()
    k = num_to_prune(SPARSITY, s.numel())
    if args.mode == "kthvalue":
        sec, v = best_of(lambda: torch.kthvalue(s.view(-1), k).values.item(), args.repeats)
        return {"seconds": sec, "value": v, "extra_rss_mb": peak_rss_mb() - base}
    chunks = flat_chunks(s, args.chunk)
    sec, thr = best_of(lambda: kth_threshold(lambda: chunks, k), args.repeats)
    msec, mask = best_of(lambda: tensor_mask(s, SPARSITY, chunk_elems=args.chunk), args.repeats)
    return {"seconds": sec, "mask_seconds": msec, "value": thr.value, "masked": int(mask.sum()), "k": k,
            "extra_rss_mb": peak_rss_mb() - base}  # fmt: skip


def work_global(args) -> dict:
    from llm_gradprune.selection.scorestore import ScoreStore
    from llm_gradprune.selection.select import kth_threshold, num_to_prune, threshold_masks

    tensors = args.tensors
    total = tensors * ROWS * COLS
    k = num_to_prune(SPARSITY, total)
    if args.mode == "kthvalue":
        data = torch.cat([c for t in range(tensors) for c in tensor_chunks(t, args.chunk, args.seed)])
        base = peak_rss_mb()
        c0 = time.process_time()
        sec, v = best_of(lambda: torch.kthvalue(data, k).values.item(), 1)
        return {
            "seconds": sec,
            "cpu_seconds": time.process_time() - c0,
            "value": v,
            "peak_rss_mb": peak_rss_mb(),
            "extra_rss_mb": peak_rss_mb() - base,
        }
    with ScoreStore(args.dir, args.chunk) as store:
        t0, c0 = time.perf_counter(), time.process_time()
        for t in range(tensors):
            store.write_chunks(f"t{t}", (ROWS, COLS), tensor_chunks(t, args.chunk, args.seed))
        t1, c1 = time.perf_counter(), time.process_time()
        thr = kth_threshold(store.chunks, k, sample=store.sampler)
        t2, c2 = time.perf_counter(), time.process_time()
        masked = less = less_eq = 0
        v = thr.value
        for chunk, mask in zip(store.chunks(), threshold_masks(store.chunks(), thr), strict=True):
            masked += int(torch.count_nonzero(mask))
            less += int(torch.count_nonzero(chunk < v))
            less_eq += int(torch.count_nonzero(chunk <= v))
        t3 = time.perf_counter()
        # time the mask pass alone (the loop above also re-reads and counts for the check)
        t4, c4 = time.perf_counter(), time.process_time()
        for mask in threshold_masks(store.chunks(), thr):
            int(torch.count_nonzero(mask))
        t_mask, c_mask = time.perf_counter() - t4, time.process_time() - c4
    return {
        "scores": total, "k": k, "value": v, "ties": thr.ties, "masked": masked, "less": less,
        "less_eq": less_eq, "exact": masked == k and less < k <= less_eq,
        "write_seconds": t1 - t0, "threshold_seconds": t2 - t1, "mask_seconds": t_mask,
        "check_seconds": t3 - t2, "peak_rss_mb": peak_rss_mb(),
        "cpu_write_seconds": c1 - c0, "cpu_threshold_seconds": c2 - c1, "cpu_mask_seconds": c_mask,
    }  # fmt: skip


def run_worker(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_select.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (same for kthvalue and ours)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1 << 24, help="select_chunk_elems")
    ap.add_argument("--sizes", default="3,11,34", help="tensors of 11008x4096 in the global selection")
    ap.add_argument("--dir", default=None, help="parent folder of the temporary score files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-tensor", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--what", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tensors", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        res = work_tensor(args) if args.what == "tensor" else work_global(args)
        print(json.dumps(res))
        return

    common = ["--threads", str(args.threads), "--repeats", str(args.repeats), "--chunk", str(args.chunk),
              "--seed", str(args.seed)] + (["--dir", args.dir] if args.dir else [])  # fmt: skip
    report: dict = {"threads": args.threads, "chunk_elems": args.chunk, "sparsity": SPARSITY}
    if not args.skip_tensor:
        kv = run_worker([*common, "--what", "tensor", "--mode", "kthvalue"])
        ours = run_worker([*common, "--what", "tensor", "--mode", "ours"])
        report["tensor"] = {"kthvalue": kv, "ours": ours, "identical": kv["value"] == ours["value"]}
        print(f"one {ROWS}x{COLS} tensor: kthvalue {kv['seconds']:.2f} s; ours threshold "
              f"{ours['seconds']:.2f} s ({ours['seconds'] / kv['seconds']:.2f}x), threshold+mask "
              f"{ours['mask_seconds']:.2f} s; same value: {kv['value'] == ours['value']}; masked "
              f"{ours['masked']} of k={ours['k']}", flush=True)  # fmt: skip
    sizes = [int(x) for x in args.sizes.split(",")]
    report["global"] = []
    for tensors in sizes:
        res = run_worker([*common, "--what", "global", "--mode", "ours", "--tensors", str(tensors)])
        if tensors == min(sizes):
            kv = run_worker([*common, "--what", "global", "--mode", "kthvalue", "--tensors", str(tensors)])
            res["kthvalue"] = kv
            res["identical"] = kv["value"] == res["value"]
        report["global"].append(res)
        sel = res["threshold_seconds"] + res["mask_seconds"]
        line = (f"global {res['scores'] / 1e9:.3f} B scores: write {res['write_seconds']:.1f} s, threshold "
                f"{res['threshold_seconds']:.1f} s, masks {res['mask_seconds']:.1f} s "
                f"({1e9 * sel / res['scores']:.2f} ns/score; CPU time threshold "
                f"{res['cpu_threshold_seconds']:.1f} s + masks {res['cpu_mask_seconds']:.1f} s = "
                f"{1e9 * (res['cpu_threshold_seconds'] + res['cpu_mask_seconds']) / res['scores']:.2f} ns/score), peak RSS {res['peak_rss_mb']:.0f} MB, "
                f"exact {res['exact']}")  # fmt: skip
        if "kthvalue" in res:
            line += (f"; torch.kthvalue in RAM {res['kthvalue']['seconds']:.1f} s (peak RSS "
                     f"{res['kthvalue']['peak_rss_mb']:.0f} MB), same value {res['identical']}")  # fmt: skip
        print(line, flush=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
