"""Reconstruction benchmark: SparseGPT and OBS updates on top of criterion masks, SmolLM2-135M.

Protocol (the quality benchmark's): builtin:smollm2-135m in fp32; calibration = 64 blocks x 512 tokens
of builtin:imdb split train (seed 0); evaluation = 64 windows x 512 tokens of split test (seed 0) with
`evaluate.perplexity`; targets = every Linear in the decoder layers. Each row restores the dense
weights, prunes layer-wise (sequential: each block calibrated on the outputs of the pruned blocks
before it) and evaluates. Gradient statistics (E[g^2] over the 64 calibration blocks, batch size 1)
are computed once on the dense model and cached on disk (`--grad-cache`).

    PYTHONPATH=$PWD nohup nice -n 10 python scripts/bench_reconstruction.py \
        --rows sparsegpt-2:4,sparsegpt-50 --json docs/bench_reconstruction.json > bench.log 2>&1 &

Rows are `METHOD-PATTERN` with PATTERN 2:4 or 50 and METHOD one of: sparsegpt, sparsegpt+fisherG
(sparsegpt with saliency x E[g^2]^G), or CRITERION+obs / CRITERION (no reconstruction) for any
criterion, plus `dense`. Results are merged into the JSON file row by row, so an interrupted run keeps
what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from llm_gradprune.calibrate import calibrate
from llm_gradprune.config import PruneConfig
from llm_gradprune.data import load_blocks, micro_batches, token_hash
from llm_gradprune.evaluate import perplexity
from llm_gradprune.pipeline import load_model
from llm_gradprune.sequential import prune_layer_wise_
from llm_gradprune.stats import GradStats
from llm_gradprune.targets import find_targets

REFERENCE = {"sparsegpt-2:4": 142.21, "sparsegpt-50": 84.07, "wanda-2:4": 298.72, "wanda-50": 100.70}


def row_config(row: str, base: dict) -> PruneConfig:
    method, _, pat = row.rpartition("-")
    pattern = {"50": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}.get(pat)
    if pattern is None:
        raise SystemExit(f"row {row!r}: pattern must be 2:4 or 50")
    kw = {**base, **pattern}
    if method == "sparsegpt":
        kw["criterion"] = "sparsegpt"
    elif method.startswith("sparsegpt+fisher"):
        kw.update(criterion="sparsegpt", sparsegpt_grad_exp=float(method[len("sparsegpt+fisher") :]))
    elif method.endswith("+obs"):
        kw.update(criterion=method[: -len("+obs")], reconstruct="obs", sequential=True)
    else:
        kw.update(criterion=method, sequential=True)
    return PruneConfig(**kw)


def needs_grad(cfg: PruneConfig) -> bool:
    from llm_gradprune import criteria

    if cfg.criterion == "sparsegpt":
        return bool(cfg.sparsegpt_grad_exp)
    return "grad_sq_sum" in criteria.get(cfg.criterion).accumulators


def gradient_stats(model, blocks, targets, cache: Path) -> GradStats:
    params = {f"{n}.weight": m.weight for n, m in targets.items()}
    stats = GradStats(params, {"grad_sq_sum"})
    key = token_hash(blocks)
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu")
        if saved["token_sha256"] == key:
            stats.sums["grad_sq_sum"] = saved["grad_sq_sum"]
            stats.counts = saved["counts"]
            print(f"gradient statistics loaded from {cache}", flush=True)
            return stats
    for p in model.parameters():
        p.requires_grad_(False)
    counters = calibrate(model, micro_batches(blocks, 1), stats, None, progress=False)
    print(f"gradient pass: {counters['seconds']:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"token_sha256": key, "grad_sq_sum": stats.sums["grad_sq_sum"], "counts": stats.counts,
         "seconds": counters["seconds"]},
        cache,
    )  # fmt: skip
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="sparsegpt-2:4,sparsegpt-50")
    ap.add_argument("--json", default="docs/bench_reconstruction.json")
    ap.add_argument("--grad-cache", default="out/bench_cache/grad_sq_sum.pt")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = {"num_samples": args.num_samples, "seq_len": args.seq_len, "progress": False}
    cfg0 = PruneConfig(**base)
    model, tokenizer, _ = load_model(cfg0)
    model.eval()
    calib = load_blocks(cfg0, tokenizer)
    evalb = load_blocks(cfg0, tokenizer, split=cfg0.eval_split, num_blocks=args.eval_samples, seed=0)
    targets = find_targets(model)
    dense = {n: m.weight.detach().clone() for n, m in targets.items()}
    grad_stats = None

    out = Path(args.json)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("protocol", {
        "model": cfg0.model, "dtype": "float32", "calibration": f"{args.num_samples} x {args.seq_len} "
        f"builtin:imdb train seed 0", "evaluation": f"{args.eval_samples} x {args.seq_len} builtin:imdb "
        "test seed 0", "calibration_sha256": token_hash(calib), "evaluation_sha256": token_hash(evalb),
        "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
    })  # fmt: skip
    results.setdefault("rows", {})
    for row in [r for r in args.rows.split(",") if r]:
        with torch.no_grad():
            for n, m in targets.items():
                m.weight.copy_(dense[n])
        if row == "dense":
            ev = perplexity(model, evalb, progress=False)
            results["rows"][row] = {"ppl": ev["ppl"], "eval_s": ev["seconds"]}
        else:
            cfg = row_config(row, base)
            grad_s = None
            if needs_grad(cfg) and grad_stats is None:
                t = time.perf_counter()
                grad_stats = gradient_stats(model, calib, targets, Path(args.grad_cache))
                grad_s = time.perf_counter() - t
            start, cpu0 = time.perf_counter(), time.process_time()
            res = prune_layer_wise_(
                model, micro_batches(calib, 1), cfg, targets=targets, return_masks=False,
                grad_stats=grad_stats if needs_grad(cfg) else None,
            )  # fmt: skip
            prune_s, prune_cpu_s = time.perf_counter() - start, time.process_time() - cpu0
            rep = res.report
            ev = perplexity(model, evalb, progress=False)
            results["rows"][row] = {
                "ppl": ev["ppl"],
                "prune_s": prune_s,
                "prune_cpu_s": prune_cpu_s,  # CPU seconds: the fair measure on a shared machine
                "gradient_pass_s": grad_s,
                "eval_s": ev["seconds"],
                "sparsity": rep["overall_sparsity"],
                "nm_valid": all(t.get("nm_groups_valid", 1) for t in rep["per_tensor"].values()),
                "max_hessian_bytes": rep["hessian_bytes"]["max_per_layer"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "timings_s": rep["timings_s"],
                "config": {k: v for k, v in cfg.to_dict().items() if k in (
                    "criterion", "scope", "pattern", "sparsity", "reconstruct", "sequential", "blocksize",
                    "percdamp", "sparsegpt_grad_exp", "gblm_alpha", "blend")},
            }  # fmt: skip
        r = results["rows"][row]
        print(
            f"{row}: ppl {r['ppl']:.2f}  prune {r.get('prune_s', 0):.0f} s  eval {r['eval_s']:.0f} s",
            flush=True,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = [
        "| row | held-out ppl | reference code | prune wall (s) | prune CPU (s) | sparsity |",
        "|---|---|---|---|---|---|",
    ]
    for row, r in results["rows"].items():
        ref = REFERENCE.get(row)
        ppl = r["ppl"]
        lines.append(
            f"| {row} | {ppl:.2f} | {ref if ref else '-'} | "
            f"{r.get('prune_s', float('nan')):.0f} | {r.get('prune_cpu_s', float('nan')):.0f} | "
            f"{r.get('sparsity', 0):.4f} |"
            if math.isfinite(ppl)
            else f"| {row} | {ppl} | - | - | - | - |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
