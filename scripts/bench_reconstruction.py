"""Reconstruction benchmark: SparseGPT and OBS updates on top of criterion masks, SmolLM2-135M.

Protocol (the quality benchmark's): builtin:smollm2-135m in fp32; calibration = 64 blocks x 512 tokens
of builtin:imdb split train (seed 0); evaluation = 64 windows x 512 tokens of split test (seed 0) with
`evaluate.perplexity`; targets = every Linear in the decoder layers (`scripts/protocol.py`). Each row
restores the dense weights, prunes layer-wise with `prune_` (sequential: each block calibrated on the
outputs of the pruned blocks before it) and evaluates. The dense model's whole-model statistics over
the 64 calibration blocks (batch size 1) are gathered once by the library and kept on disk
(`--stats-cache`, shared with bench_quality.py).

    nohup nice -n 10 python scripts/bench_reconstruction.py \
        --rows sparsegpt-2:4,sparsegpt-50 --key threads_1 > bench.log 2>&1 &

Rows are `METHOD[+MOD...]-PATTERN` with PATTERN 2:4 or 50, METHOD sparsegpt or any criterion (layer-wise,
no reconstruction unless a MOD asks), MOD one of obs / lsq (reconstruction of the kept weights),
fisherG / tokenfisherG (sparsegpt's saliency times a gradient factor to the power G, see
`scoring.criteria.sparsegpt_prior`), dampP (percdamp P), tensor / global (the criterion's scope; default
row), ts (true_sequential); plus `dense`. `--eval-seeds 1,2` also evaluates every row on other held-out
window samples. Results are merged row by row under `--key` of the merged record --json
(docs/bench_reconstruction.json), so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch
from benchjson import command_line, record, result_of
from protocol import Protocol, token_hash

from llm_gradprune import JobConfig, prune_
from llm_gradprune.evaluate import perplexity

REFERENCE = {"sparsegpt-2:4": 142.21, "sparsegpt-50": 84.07, "wanda-2:4": 298.72, "wanda-50": 100.70}


def row_config(row: str, base: dict):
    """`METHOD[+MOD...]-PATTERN`: METHOD sparsegpt or a criterion; MOD obs | lsq (reconstruction),
    fisherG | tokenfisherG (sparsegpt's gradient factor to the power G), dampP (percdamp P)."""
    method, _, pat = row.rpartition("-")
    pattern = {"50": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}.get(pat)
    if pattern is None:
        raise SystemExit(f"row {row!r}: pattern must be 2:4 or 50")
    name, *mods = method.split("+")
    kw = {**base, **pattern, "criterion": name, "allow_empty_tensors": True}
    if name != "sparsegpt":
        kw["sequential"] = True
    for mod in mods:
        if mod in ("tensor", "global"):
            kw["scope"] = mod
        elif mod == "ts":
            kw["true_sequential"] = True
        elif mod in ("obs", "lsq"):
            kw["reconstruct"] = mod
        elif mod.startswith("tokenfisher"):
            kw.update(sparsegpt_prior="token_fisher", sparsegpt_grad_exp=float(mod[len("tokenfisher") :]))
        elif mod.startswith("fisher"):
            kw.update(sparsegpt_prior="fisher", sparsegpt_grad_exp=float(mod[len("fisher") :]))
        elif mod.startswith("damp"):
            kw["percdamp"] = float(mod[len("damp") :])
        else:
            raise SystemExit(f"row {row!r}: unknown modifier {mod!r}")
    return JobConfig.from_flat(kw).prune


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="sparsegpt-2:4,sparsegpt-50")
    ap.add_argument("--json", default="docs/bench_reconstruction.json", help="merged record file")
    ap.add_argument("--key", default="threads_1", help="the record's key the rows are merged under")
    ap.add_argument("--stats-cache", default="out/bench_quality", help="bench_quality.py's --cache-dir")
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    ap.add_argument("--eval-seeds", default="", help="extra held-out samples to evaluate each row on")
    ap.add_argument("--report", action="store_true", help="only print the table of the JSON file")
    ap.add_argument("--markdown", type=Path, help="with --report: replace the table between the markers here")
    args = ap.parse_args(argv)
    if args.report:
        text = table(result_of(args.json, args.key))
        print(text)
        if args.markdown:
            md = args.markdown.read_text()
            start, end = "<!-- bench_reconstruction:start -->", "<!-- bench_reconstruction:end -->"
            if start not in md or end not in md:
                raise SystemExit(f"{args.markdown}: no {start} ... {end} markers to replace")
            md = md[: md.index(start) + len(start)] + "\n" + text + "\n" + md[md.index(end) :]
            args.markdown.write_text(md)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = {"progress": False}
    proto = Protocol(eval_samples=args.eval_samples)
    calib, evalb, model = proto.calib, proto.eval_blocks, proto.model
    extra = {int(s): proto.held_out(int(s), args.eval_samples) for s in args.eval_seeds.split(",") if s}
    stats = None

    results = result_of(args.json, args.key, default={})
    results.setdefault("protocol", {
        "model": proto.job.model, "dtype": "float32", "calibration": "64 x 512 builtin:imdb train seed 0",
        "evaluation": f"{args.eval_samples} x 512 builtin:imdb test seed 0", "calibration_sha256": token_hash(calib), "evaluation_sha256": token_hash(evalb),
        "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
    })  # fmt: skip
    results.setdefault("rows", {})
    for row in [r for r in args.rows.split(",") if r]:
        proto.restore_dense_()
        if row == "dense":
            ev = perplexity(model, evalb, progress=False)
            results["rows"][row] = {"ppl": ev["ppl"], "eval_s": ev["seconds"]}
        else:
            cfg = row_config(row, base)
            if stats is None:  # the dense model's gradient statistics: one library pass, cached on disk
                stats = proto.statistics(Path(args.stats_cache))
            start, cpu0 = time.perf_counter(), time.process_time()
            res = prune_(
                model, proto.batches(), cfg, targets=proto.targets, return_masks=False, statistics=stats
            )
            prune_s, prune_cpu_s = time.perf_counter() - start, time.process_time() - cpu0
            rep = res.report
            ev = perplexity(model, evalb, progress=False)
            results["rows"][row] = {
                "ppl": ev["ppl"],
                "prune_s": prune_s,
                "prune_cpu_s": prune_cpu_s,  # CPU seconds: the fair measure on a shared machine
                "eval_s": ev["seconds"],
                "sparsity": rep["overall_sparsity"],
                "nm_valid": all(t.get("nm_groups_valid", 1) for t in rep["per_tensor"].values()),
                "max_hessian_bytes": rep["hessian_bytes"]["max_per_layer"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "timings_s": rep["timings_s"],
                "config": {k: v for k, v in cfg.to_dict().items() if k in (
                    "criterion", "criterion_params", "scope", "pattern", "sparsity", "reconstruct", "sequential",
                    "blocksize", "percdamp", "true_sequential")},
            }  # fmt: skip
        r = results["rows"][row]
        for seed, blocks in extra.items():  # the same pruned weights on another held-out sample
            r[f"ppl_eval_seed_{seed}"] = perplexity(model, blocks, progress=False)["ppl"]
        print(
            f"{row}: ppl {r['ppl']:.2f}  prune {r.get('prune_s', 0):.0f} s  eval {r['eval_s']:.0f} s"
            + "".join(f"  seed {s}: {r[f'ppl_eval_seed_{s}']:.2f}" for s in extra),
            flush=True,
        )
        # merge into what is on disk now: another run may have added rows to the same key meanwhile
        latest = result_of(args.json, args.key, default={})
        latest.setdefault("protocol", results["protocol"])
        latest.setdefault("rows", {})[row] = r
        results["rows"] = dict(latest["rows"])
        record(args.json, args.key, [command_line()], latest, append=True)
    print(table(results))
    return 0


REF_DENSE = 49.29


def table(results: dict) -> str:
    """Markdown table of the rows, with each perplexity divided by the dense model's on the same windows
    (the held-out text differs from the reference's, so ratios are what compare across splits)."""
    rows = results["rows"]
    dense = rows.get("dense", {})
    seeds = sorted({k for r in rows.values() for k in r if k.startswith("ppl_eval_seed_")})
    head = ["row", "held-out ppl", "/ dense"] + [f"seed {k.rsplit('_', 1)[1]} (/ dense)" for k in seeds]
    head += ["reference code (/ dense 49.29)", "prune wall s", "prune CPU s", "sparsity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in rows.items():
        ppl = r["ppl"]
        cells = [f"`{row}`", f"{ppl:.2f}", f"{ppl / dense['ppl']:.3f}" if dense else "-"]
        for k in seeds:
            v, d = r.get(k), dense.get(k)
            cells.append(f"{v:.2f} ({v / d:.3f})" if v and d else "-")
        ref = REFERENCE.get(row)
        cells.append(f"{ref} ({ref / REF_DENSE:.3f})" if ref else "-")
        cells += [f"{r['prune_s']:.0f}" if "prune_s" in r else "-",
                  f"{r['prune_cpu_s']:.0f}" if "prune_cpu_s" in r else "-",
                  f"{r.get('sparsity', 0):.4f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |" if math.isfinite(ppl) else f"| `{row}` | {ppl} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
