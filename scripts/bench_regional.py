"""The block-local gradient criteria `block_fisher` (the block output's per-token curvature) and
`regional` (Wanda++ regional gradients) on the quality protocol, in domain and out of domain, against
wanda, sparsegpt (mask only and with its OBS update), token_fisher and the fisher global recipe (issue
26, item 1).

    nice -n 10 python scripts/bench_regional.py --num-samples 16 --rows block_fisher/row/0.5
    nice -n 10 python scripts/bench_regional.py --num-samples 16 --rows main
    nice -n 10 python scripts/bench_regional.py --num-samples 16 --timing 2 --key calib_16_timing_block_fisher \
        --rows sparsegpt/-/0.5,block_fisher/row/0.5      # prune times only, alternating
    python scripts/bench_regional.py --num-samples 16 --report

Protocol (scripts/protocol.py): builtin:smollm2-135m fp32; calibration = the first `--num-samples` of
the protocol's 64 x 512 blocks of builtin:imdb train (seed 0; 64 is the full protocol), the same blocks
for every row of a run, for the whole-model statistics (cached on disk per token hash, shared with the
other benchmarks) and for the layer-wise passes; in-domain = 64 x 512 held-out windows of builtin:imdb
test (seed 0); out-of-domain = 32 x 512 windows of the licence texts in /usr/share/common-licenses
(scripts/bench_recovery.py's loader). The dense model's two perplexities are the recorded ones
(docs/bench_quality.json `main`, its evaluation token hash checked; docs/bench_recovery.json `lr_1e-4`).

A row spec is CRITERION[:k=v,...]/SCOPE/SPARSITY_OR_N:M[@RECONSTRUCT] (SCOPE `-`: the criterion's own,
as sparsegpt needs), or RECIPE[@RECONSTRUCT] for configs/recipe_50.yaml and configs/recipe_2of4.yaml
(their pruning settings without their block refit; the job settings are the protocol's), e.g. `regional:alpha=10/row/0.5`,
`sparsegpt/-/2:4@none`, `recipe_50@none`; `&FIELD=VALUE` appends any PruneConfig setting, e.g.
`regional:alpha=0.1/row/0.5&sequential=true` (statistics on the pruned model's block inputs; a
block-local criterion alone reads the dense model's by default). Each row is one `prune_(model, batches, cfg, statistics=...)`
call timed on its own (`prune_s`: what a user's sweep pays once the statistics exist), then both
evaluations; rows merge one by one under `--key` (default calib_<num-samples>) of
docs/bench_regional.json, so an interrupted run keeps what it measured and a rerun skips them.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import yaml
from bench_quality import parse_row
from bench_recovery import protocol_with_ood
from benchjson import command_line, result_of, save
from protocol import ROOT, Protocol, recipe_settings, token_hash

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.evaluate import perplexity
from llm_gradprune.scoring.criteria import CRITERIA

RECIPES = ("recipe_50", "recipe_2of4")
ROW_SETS = {
    "main": [
        "block_fisher/row/0.5", "regional:alpha=100/row/0.5", "wanda/row/0.5", "sparsegpt/-/0.5@none", "sparsegpt/-/0.5",
        "token_fisher/row/0.5", "recipe_50@none", "recipe_50",
    ],
    "nm": [
        "block_fisher/nm/2:4", "regional:alpha=100/nm/2:4", "wanda/nm/2:4", "sparsegpt/-/2:4@none", "sparsegpt/-/2:4",
        "token_fisher/nm/2:4", "recipe_2of4@none", "recipe_2of4",
    ],
}  # fmt: skip
DENSE_IMDB = ("docs/bench_quality.json", "main")  # rows.dense.ppl, protocol.eval_tokens_sha256
DENSE_OOD = ("docs/bench_recovery.json", "lr_1e-4")  # rows.dense.ppl_ood


def row_config(spec: str) -> dict:
    """The PruneConfig settings a row spec stands for (see the module docstring)."""
    spec, *extra = spec.split("&")
    base, _, reconstruct = spec.partition("@")
    if base in RECIPES:
        kw = recipe_settings(base, block=False)
    else:
        kw = parse_row(base)
        if kw.get("scope") == "-":
            del kw["scope"]
    if reconstruct:
        kw["reconstruct"] = reconstruct
    kw = {**kw, "allow_empty_tensors": True, "progress": False}
    for k, _, v in (e.partition("=") for e in extra):  # e.g. `&sequential=false`: any PruneConfig field
        kw[k] = yaml.safe_load(v)
    PruneConfig(**kw)  # a bad spec fails here, before the model is loaded
    return kw


def dense_row(eval_hash: str) -> dict:
    """The dense model's recorded perplexities; the in-domain one only if its windows are ours."""
    quality = result_of(ROOT / DENSE_IMDB[0], DENSE_IMDB[1])
    if quality["protocol"]["eval_tokens_sha256"] != eval_hash:
        raise SystemExit(
            f"{DENSE_IMDB[0]}: its held-out windows are not this run's; evaluate the dense model"
        )
    ood = result_of(ROOT / DENSE_OOD[0], DENSE_OOD[1])["rows"]["dense"]["ppl_ood"]
    return {"ppl_imdb": quality["rows"]["dense"]["ppl"], "ppl_ood": ood,
            "reused_from": [f"{DENSE_IMDB[0]} {DENSE_IMDB[1]}", f"{DENSE_OOD[0]} {DENSE_OOD[1]}"]}  # fmt: skip


def one_row(spec: str, proto: Protocol, stats, ood: torch.Tensor, threads: int) -> dict:
    kw = row_config(spec)
    proto.restore_dense_()
    t = time.perf_counter()
    report = prune_(proto.model, proto.batches(), PruneConfig(threads=threads, **kw), targets=proto.targets,
                    statistics=stats, return_masks=False).report  # fmt: skip
    row = {"settings": kw, "prune_s": time.perf_counter() - t, "sparsity": report["overall_sparsity"],
           "timings_s": report.get("timings_s", {}), "criterion_params": report.get("criterion_params")}  # fmt: skip
    for name, blocks in (("imdb", proto.eval_blocks), ("ood", ood)):
        r = perplexity(proto.model, blocks, batch_size=4, progress=False)
        row[f"ppl_{name}"], row[f"eval_{name}_s"] = r["ppl"], r["seconds"]
    return row


def timing(specs: list[str], repeats: int, proto: Protocol, stats, threads: int) -> dict:
    """Prune times only (no evaluation), the specs alternating `repeats` times, so that each sees the
    same load of a shared machine; the minimum of each is its time."""
    seconds: dict[str, list[float]] = {s: [] for s in specs}
    for _ in range(repeats):
        for spec in specs:
            proto.restore_dense_()
            t = time.perf_counter()
            prune_(proto.model, proto.batches(), PruneConfig(threads=threads, **row_config(spec)),
                   targets=proto.targets, statistics=stats, return_masks=False)  # fmt: skip
            seconds[spec].append(time.perf_counter() - t)
            print(f"timing {spec}: {seconds[spec][-1]:.1f} s", flush=True)
    return {"seconds": seconds, "min_s": {s: min(v) for s, v in seconds.items()}, "command": command_line()}


def table(result: dict) -> str:
    rows, dense = result["rows"], result["dense"]
    t = rows.get("sparsegpt/-/0.5", {}).get("prune_s")  # a plain sparsegpt pass: every row's time unit
    lines = ["| row | IMDB ppl | x dense | out-of-domain ppl | x dense | sparsity | prune s | x sparsegpt |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense | {dense['ppl_imdb']:.2f} | 1 | {dense['ppl_ood']:.2f} | 1 | 0 | - | - |"]  # fmt: skip
    for spec, r in rows.items():
        rel = f"{r['prune_s'] / t:.2f}" if t else "-"
        lines.append(f"| `{spec}` | {r['ppl_imdb']:.2f} | {r['ppl_imdb'] / dense['ppl_imdb']:.3f} | {r['ppl_ood']:.2f} "
                     f"| {r['ppl_ood'] / dense['ppl_ood']:.3f} | {r['sparsity']:.4f} | {r['prune_s']:.0f} | {rel} |")  # fmt: skip
    if "timing" in result:
        m = result["timing"]["min_s"]
        ref = m.get("sparsegpt/-/0.5")
        lines += ["", "| timed alternately (prune only) | runs | min s | x sparsegpt |", "|---|---|---|---|"]
        for spec, v in result["timing"]["seconds"].items():
            lines.append(
                f"| `{spec}` | {len(v)} | {m[spec]:.1f} | {m[spec] / ref:.2f} |"
                if ref
                else f"| `{spec}` | {len(v)} | {m[spec]:.1f} | - |"
            )
    return "\n".join(lines)


def block_local(spec: str) -> bool:
    """Whether a row spec's criterion is one of the block-local ones (regional, block_fisher)."""
    name = spec.split("/")[0].split(":")[0]
    return name in CRITERIA and CRITERIA.get(name).block_local


def targets(result: dict) -> str:
    """Issue 26's target for a block-local criterion: at 50% per row below wanda and mask-only sparsegpt."""
    rows, out = result["rows"], []
    for spec in (s for s in rows if block_local(s) and s.split("&")[0].endswith("/row/0.5")):
        for other in ("wanda/row/0.5", "sparsegpt/-/0.5@none"):
            if other in rows:
                for d in ("imdb", "ood"):
                    a, b = rows[spec][f"ppl_{d}"], rows[other][f"ppl_{d}"]
                    out.append(
                        f"{spec} vs {other} ({d}): {a:.2f} vs {b:.2f}: {'met' if a < b else 'NOT met'}"
                    )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="main", help="comma list of row specs and row sets (main, nm)")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration blocks (first N of the 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    ap.add_argument("--force", action="store_true", help="rerun rows already recorded under --key")
    ap.add_argument("--record", default=str(ROOT / "docs" / "bench_regional.json"), help="merged record file")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_regional.json"), help="this run's raw result")
    ap.add_argument("--key", default=None, help="record key (default calib_<num-samples>)")
    ap.add_argument("--timing", type=int, default=0, help="only time the --rows' prunes, alternating N times")
    ap.add_argument("--report", action="store_true", help="print the recorded table and exit")
    args = ap.parse_args(argv)
    args.key = args.key or f"calib_{args.num_samples}"
    if args.report:
        result = result_of(args.record, args.key)
        print(table(result) + "\n\n" + targets(result))
        return 0
    specs = [s for item in args.rows.split(",") if item for s in ROW_SETS.get(item, [item])]
    for s in specs:
        row_config(s)
    proto, ood, stats = protocol_with_ood(args.num_samples, args.threads)
    result = result_of(args.record, args.key, default={"rows": {}})
    result["dense"] = dense_row(token_hash(proto.eval_blocks))
    result["protocol"] = {"model": proto.job.model, "calibration_blocks": len(proto.calib), "seq_len": 512,
                          "calibration_tokens_sha256": token_hash(proto.calib),
                          "eval_tokens_sha256": token_hash(proto.eval_blocks), "ood_tokens_sha256": token_hash(ood),
                          "ood": "32 x 512 of /usr/share/common-licenses", "threads": args.threads}  # fmt: skip
    if args.timing:
        result["timing"] = timing(specs, args.timing, proto, stats, args.threads)
        save(args, result, append=True)
        specs = []
    for spec in specs:
        if spec in result["rows"] and not args.force:
            print(f"{spec}: recorded already (--force reruns it)", flush=True)
            continue
        row = one_row(spec, proto, stats, ood, args.threads)
        result["rows"][spec] = {**row, "command": command_line()}
        save(args, result, append=True)
        print(
            f"{spec}: IMDB {row['ppl_imdb']:.2f}, ood {row['ppl_ood']:.2f}, prune {row['prune_s']:.0f} s",
            flush=True,
        )
    print(table(result) + "\n\n" + targets(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
