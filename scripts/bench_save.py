"""Memory of masking and saving: does writing the pruned checkpoint cost a second copy of the model?

    python scripts/bench_save.py --out out/bench_save.json \
        [--models smollm2,tinyllama --dtypes float32,bfloat16 --tinyllama-layers 8 --shard-sizes 5GB,200MB]

For every (model, dtype, max_shard_size), in a fresh process: build the model (as in
`bench_calibration.py`), prune it 50% by magnitude per row with `prune_` (masks applied in place), then
write, verify and install the checkpoint with `checkpoint.save_pruned`, the path `llm-gradprune prune`
takes. Peak resident memory (VmHWM, reset before each phase) is reported for the masking phase and the
saving phase as the excess over the resident size before the phase, and as a fraction of the model's
parameter bytes. Target (issue 5): saving peaks near the model's size, i.e. the excess is a small
fraction of it, not a second copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args) -> dict:
    from bench_calibration import build, reset_peak, vm_kb

    from llm_gradprune import JobConfig, prune_
    from llm_gradprune.io.checkpoint import save_pruned

    dtype = getattr(torch, args.dtype)
    model = build(args.model, dtype, args.tinyllama_layers).eval()
    with torch.no_grad():  # from_pretrained may map the weights lazily: make all of them resident first,
        for p in model.parameters():  # so the phases below are not charged for first page-ins
            p.add_(0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cfg = JobConfig.from_flat({"criterion": "magnitude", "scope": "row", "sparsity": 0.5, "progress": False,
                                   "max_shard_size": args.shard_size, "output_dir": str(Path(tmp) / "out")})  # fmt: skip
        before_mask = vm_kb("VmRSS")
        reset_peak()
        t = time.perf_counter()
        report = prune_(model, None, cfg.prune, return_masks=False).report
        mask_s = time.perf_counter() - t
        mask_peak = vm_kb("VmHWM")
        before_save = vm_kb("VmRSS")
        reset_peak()
        t = time.perf_counter()
        out = save_pruned(
            model, None, report, cfg.output_dir, settings=cfg.to_flat(), max_shard_bytes=cfg.max_shard_bytes
        )
        save_s = time.perf_counter() - t
        save_peak = vm_kb("VmHWM")
        files = sorted(p.name for p in out.glob("*.safetensors"))
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    mb = 1 / 1024
    return {
        "model": args.model, "dtype": args.dtype, "max_shard_size": args.shard_size,
        "model_mb": model_bytes / 2**20, "shards": len(files), "written_mb": written / 2**20,
        "mask_s": mask_s, "save_s": save_s,
        "rss_before_mask_mb": before_mask * mb, "mask_excess_mb": (mask_peak - before_mask) * mb,
        "rss_before_save_mb": before_save * mb, "save_excess_mb": (save_peak - before_save) * mb,
        "mask_excess_frac": (mask_peak - before_mask) * 1024 / model_bytes,
        "save_excess_frac": (save_peak - before_save) * 1024 / model_bytes,
        "sparsity": report["overall_sparsity"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_save.json")
    ap.add_argument("--models", default="smollm2,tinyllama")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shard-sizes", default="5GB,200MB")
    ap.add_argument("--tinyllama-layers", type=int, default=8)
    ap.add_argument("--tmp", default=None, help="folder for the checkpoints (default: the system's)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--shard-size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    print(f"{'model':9s} {'dtype':8s} {'shard':>6s} {'model MB':>9s} {'shards':>6s} {'mask +MB':>9s} "
          f"{'save +MB':>9s} {'save +frac':>10s} {'save s':>7s}")  # fmt: skip
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for shard in args.shard_sizes.split(","):
                cmd = [sys.executable, __file__, "--worker", "--model", model, "--dtype", dtype,
                       "--shard-size", shard, "--tinyllama-layers", str(args.tinyllama_layers)]  # fmt: skip
                if args.tmp:
                    cmd += ["--tmp", args.tmp]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"{model} {dtype} {shard} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"{model:9s} {dtype:8s} {shard:>6s} {r['model_mb']:9.0f} {r['shards']:6d} "
                      f"{r['mask_excess_mb']:9.0f} {r['save_excess_mb']:9.0f} {r['save_excess_frac']:10.3f} "
                      f"{r['save_s']:7.1f}", flush=True)  # fmt: skip
    with open(args.out, "w") as fh:
        json.dump(
            {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows}, fh, indent=2
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
