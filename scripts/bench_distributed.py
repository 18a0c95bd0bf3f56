"""1 vs 2 processes on this machine: calibration tokens/s, the cost of the final reduction, same masks?

    nice -n 10 python scripts/bench_distributed.py --out out/bench_distributed.json

(docs/bench_distributed.json keeps the recorded runs, one key each with its command.)

Prunes the built-in SmolLM2-135M (fisher, per-row 50%) three times through the real CLI:
one process, two replicated processes (each a round-robin share of the micro-batches, statistics
summed once at the end) and two FSDP2 processes (weights sharded by rows); reads each run's
pruning_report.json and compares the zero patterns of the checkpoints. Then times the final
reduction alone, on fp32 tensors of the model's target shapes, three ways: one all_reduce per tensor,
one flat all_reduce of everything concatenated (2x memory), and `distributed.all_reduce_sum_` with
several chunk sizes, with the growth of the process's peak RSS during each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ["accelerate", "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def run_cli(nproc: int, out: Path, args: argparse.Namespace, fsdp: bool) -> dict:
    launch = [*LAUNCH, "--num_processes", str(nproc)] + (["--multi_gpu"] if nproc > 1 else [])
    cmd = [*launch, str(ROOT / "scripts" / "prune_llama.py"), "--model", "builtin:smollm2-135m",
           "--criterion", "fisher", "--scope", "row", "--num-samples", str(args.num_samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--output-dir", str(out), "--overwrite",
           "--no-progress"] + (["--fsdp"] if fsdp else [])  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    rep = json.loads((out / "pruning_report.json").read_text())
    cal = rep["calibration"]
    return {
        "processes": nproc,
        "sharding": cal.get("sharding", "replicated"),
        "tokens": cal["tokens"],
        "calibration_s": rep["timings_s"]["calibration"],
        "tokens_per_s": cal["tokens"] / rep["timings_s"]["calibration"],
        "reduce": cal.get("reduce"),
        "wall_s": wall,
        "mean_loss": cal["mean_loss"],
    }


def zero_diff(a: Path, b: Path) -> int:
    from safetensors import safe_open

    diff = 0
    with (
        safe_open(str(a / "model.safetensors"), "pt") as fa,
        safe_open(str(b / "model.safetensors"), "pt") as fb,
    ):
        for k in fa.keys():
            if "proj" in k:
                diff += int(((fa.get_tensor(k) == 0) != (fb.get_tensor(k) == 0)).sum())
    return diff


def target_shapes() -> list[torch.Size]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_gradprune.calibration.assets import resolve_model
    from llm_gradprune.targets import find_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(resolve_model("builtin:smollm2-135m"))
        )
    return [m.weight.shape for m in find_targets(model).values()]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reduce_worker(out: str) -> None:
    """Launched with 2 processes: times the ways of summing one statistic of every target tensor."""
    import torch.distributed as dist

    from llm_gradprune.parallel import all_reduce_sum_, make_accelerator

    make_accelerator()
    rank = dist.get_rank()
    tensors = [torch.rand(s) for s in target_shapes()]
    n = sum(t.numel() for t in tensors)
    rows = []

    def timed(name, fn):
        dist.barrier()
        before, start = peak_mb(), time.perf_counter()
        calls = fn()
        dist.barrier()
        rows.append({"method": name, "seconds": time.perf_counter() - start, "calls": calls,
                     "peak_rss_growth_mb": peak_mb() - before})  # fmt: skip

    def per_tensor():
        for t in tensors:
            dist.all_reduce(t)
        return len(tensors)

    def flat():
        cat = torch.cat([t.view(-1) for t in tensors])
        dist.all_reduce(cat)
        at = 0
        for t in tensors:
            t.view(-1).copy_(cat[at : at + t.numel()])
            at += t.numel()
        return 1

    # order: chunked first (smallest peak first, since peak RSS only grows), flat last
    for exp in (20, 22, 24):
        timed(f"all_reduce_sum_ chunk 2^{exp}", lambda e=exp: all_reduce_sum_(tensors, 1 << e)["calls"])
    timed("one all_reduce per tensor", per_tensor)
    timed("flat concat + one all_reduce", flat)
    if rank == 0:
        Path(out).write_text(json.dumps({"elements": n, "mb": n * 4 / 2**20, "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1, help="blocks per micro-batch (FSDP splits each)")
    ap.add_argument("--skip-reduce", action="store_true", help="only the three pruning runs")
    ap.add_argument("--out", default="bench_distributed.json")
    ap.add_argument("--reduce-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reduce_worker:
        return reduce_worker(args.reduce_worker)

    results: dict = {"num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "cores": os.cpu_count()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [(1, False, "np1"), (2, False, "np2"), (2, True, "np2_fsdp")]
        results["runs"] = [run_cli(n, tmp / name, args, fsdp) for n, fsdp, name in runs]
        results["zero_pattern_diff_vs_1proc"] = {
            name: zero_diff(tmp / "np1", tmp / name) for _, _, name in runs[1:]
        }
        red = tmp / "reduce.json"
        if args.skip_reduce:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results, indent=2))
            return
        cmd = [*LAUNCH, "--num_processes", "2", "--multi_gpu", __file__, "--reduce-worker", str(red)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"reduce benchmark failed:\n{proc.stderr[-3000:]}")
        results["reduce"] = json.loads(red.read_text())
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    print("| processes | sharding | tokens | calibration s | tokens/s | final reduce s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        red_s = r["reduce"]["seconds"] if r["reduce"] else 0.0
        print(f"| {r['processes']} | {r['sharding']} | {r['tokens']} | {r['calibration_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {red_s:.2f} | {r['wall_s']:.0f} |")  # fmt: skip
    print(f"zero-pattern differences vs 1 process: {results['zero_pattern_diff_vs_1proc']}")
    rd = results["reduce"]
    print(f"\nfinal reduction of {rd['elements']:,} fp32 ({rd['mb']:.0f} MB) across 2 processes")
    print("| method | seconds | calls | peak RSS growth MB |")
    print("|---|---|---|---|")
    for r in rd["rows"]:
        print(f"| {r['method']} | {r['seconds']:.2f} | {r['calls']} | {r['peak_rss_growth_mb']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
