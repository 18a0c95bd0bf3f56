"""Block refit on the quality protocol: the recipes' masks, + lsq, + a joint refit of each decoder block.

    nice -n 10 python scripts/bench_block.py --num-samples 16 --rows dense,sgpt50,r50mask,r50,r50+b4
    python scripts/bench_block.py --num-samples 16 --report

Protocol (scripts/protocol.py): builtin:smollm2-135m fp32; calibration = the first `--num-samples` of
the protocol's 64 x 512 blocks of builtin:imdb train (seed 0; 64 is the full protocol), used by every
row of a run for both the whole-model statistics (cached on disk per token hash) and the layer-wise
pass; in-domain = 64 x 512 held-out windows of builtin:imdb test (seed 0); out-of-domain = 32 x 512
windows of the licence texts in /usr/share/common-licenses (scripts/bench_recovery.py's loader).

A row spec is BASE[+bSTEPS[:lr=LR,loss=LOSS,target=TARGET,batch=K,mask=MASK]]. BASE is one of
  dense      the dense model (evaluation only)
  sgpt50     plain sparsegpt 50% per row (its own OBS update): the time reference
  r50mask    configs/recipe_50.yaml without its update (fisher global masks, dense weights kept)
  r50        configs/recipe_50.yaml's masks and update (+ lsq)
  r24mask    configs/recipe_2of4.yaml without its update (SparseGPT's 2:4 masks, dense weights kept)
  r24obs     configs/recipe_2of4.yaml with SparseGPT's own update instead of lsq
  r24        configs/recipe_2of4.yaml's masks and update (+ lsq)
(a recipe's own block refit, if it ships one, is left out of every base: `+bSTEPS` adds one)
and `+bSTEPS` adds the block refit (`block_steps`, `block_lr` default 1e-4, `block_loss` default mse,
`block_target` default dense; rows recorded before commit 523e49e used pruned; `block_batch` default 0,
one Adam step per pass; `block_mask` default fixed), e.g. `r50+b4`, `r50mask+b4:lr=1e-3,batch=1,mask=dynamic`,
`r50+b8:lr=3e-4`, `r24+b4:loss=normalized`, `r50mask+b16:lr=1e-3,target=dense`. Rows run one after
another in this process (the dense weights restored between them); results merge row by row under
`--key` (default calib_<num-samples>) of docs/bench_block.json, so an interrupted run keeps what it
measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from bench_recovery import protocol_with_ood
from benchjson import command_line, result_of, save
from protocol import ROOT, Protocol, recipe_settings, token_hash

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.evaluate import perplexity


def recipe(name: str, **override) -> dict:
    """A recipe's masks and update without its block refit: a row's `+bSTEPS` is the refit."""
    return recipe_settings(name, block=False, **override)


BASES = {
    "dense": None,
    "sgpt50": {"criterion": "sparsegpt", "sparsity": 0.5},
    "r50mask": recipe("recipe_50", reconstruct="none"),
    "r50": recipe("recipe_50"),
    "r24mask": recipe("recipe_2of4", reconstruct="none"),
    "r24obs": recipe("recipe_2of4", reconstruct="obs"),
    "r24": recipe("recipe_2of4"),
}

# `+bSTEPS:` options, each a PruneConfig `block_<name>` field and how its text is read; PruneConfig
# checks the values (main, before the model is loaded)
BLOCK_OPTIONS = {"lr": float, "loss": str, "target": str, "batch": int, "mask": str}


def row_config(spec: str) -> dict | None:
    """The PruneConfig settings a row spec stands for (None: the dense model)."""
    base, _, block = spec.partition("+b")
    if base not in BASES:
        raise SystemExit(f"row {spec!r}: base must be one of {', '.join(BASES)}")
    if BASES[base] is None:
        if block:
            raise SystemExit(f"row {spec!r}: the dense row takes no block refit")
        return None
    kw = {**BASES[base], "allow_empty_tensors": True, "progress": False}
    if block:
        steps, _, opts = block.partition(":")
        kw["block_steps"] = int(steps)
        for k, _, v in (o.partition("=") for o in filter(None, opts.split(","))):
            if k not in BLOCK_OPTIONS:
                raise SystemExit(f"row {spec!r}: block option {k!r} is not one of {', '.join(BLOCK_OPTIONS)}")
            kw[f"block_{k}"] = BLOCK_OPTIONS[k](v)
    return kw


def split_rows(text: str) -> list[str]:
    """The row specs of a comma list; a piece `k=v` is one more block option of the spec before it
    (`r50+b16:lr=1e-3,target=dense,r24` is two rows), since a base name never holds `=`."""
    specs: list[str] = []
    for piece in filter(None, text.split(",")):
        if "=" in piece and "+b" not in piece and specs:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def refit_summary(report: dict) -> dict | None:
    """Block refit losses summed over blocks (per token), and how many blocks it improved."""
    refit = report.get("mode", {}).get("block_refit")
    if not refit:
        return None
    per = refit["per_block"]
    return {"steps": refit["steps"], "lr": refit["lr"], "loss": refit["loss"],
            "loss_before_sum": sum(b["loss_before"] for b in per), "loss_after_sum": sum(b["loss_after"] for b in per),
            "blocks_improved": sum(b["loss_after"] < b["loss_before"] for b in per), "blocks": len(per),
            "per_block": per}  # fmt: skip


def one_row(spec: str, proto: Protocol, stats, ood: torch.Tensor, threads: int) -> dict:
    kw = row_config(spec)
    proto.restore_dense_()
    row: dict = {"settings": kw, "command": command_line(), "load_before": os.getloadavg()[0]}
    if kw is not None:
        t = time.perf_counter()
        report = prune_(proto.model, proto.batches(), PruneConfig(threads=threads, **kw), targets=proto.targets,
                        statistics=stats, return_masks=False).report  # fmt: skip
        row["prune_s"] = time.perf_counter() - t
        timings = report.get("timings_s", {})
        row.update(timings_s=timings, layer_wise_s=row["prune_s"], block_refit_s=timings.get("block_refit", 0.0), sparsity=report["overall_sparsity"],
                   block_refit=refit_summary(report))  # fmt: skip
    for name, blocks in (("imdb", proto.eval_blocks), ("ood", ood)):
        r = perplexity(proto.model, blocks, batch_size=4, progress=False)
        row[f"ppl_{name}"], row[f"eval_{name}_s"] = r["ppl"], r["seconds"]
    row["load_after"] = os.getloadavg()[0]  # other jobs share the 2 cores: seconds compare within one window
    return row


def table(result: dict, ref: dict | None = None) -> str:
    """The rows as markdown; `ref`: the sparsegpt row the times are relative to (default this run's)."""
    rows = result["rows"]
    dense, ref = rows.get("dense"), ref or rows.get("sgpt50")
    lines = ["| row | settings | IMDB ppl | x dense | out-of-domain ppl | x dense-ood | layer-wise s "
             "| x sparsegpt | block refit s | block loss before -> after |", "|---" * 10 + "|"]  # fmt: skip
    for spec, r in rows.items():
        kw = r["settings"] or {}
        settings = ", ".join(
            f"{k}={v}" for k, v in kw.items() if k not in ("allow_empty_tensors", "progress")
        )
        x = f"{r['ppl_imdb'] / dense['ppl_imdb']:.3f}" if dense else "-"
        xo = f"{r['ppl_ood'] / dense['ppl_ood']:.3f}" if dense else "-"
        lw = r.get("layer_wise_s")
        rel = f"{lw / ref['layer_wise_s']:.2f}" if lw is not None and ref and ref["layer_wise_s"] else "-"
        b = r.get("block_refit")
        loss = f"{b['loss_before_sum']:.4g} -> {b['loss_after_sum']:.4g}" if b else "-"
        lines.append(f"| `{spec}` | {settings or '-'} | {r['ppl_imdb']:.2f} | {x} | {r['ppl_ood']:.2f} | {xo} | "
                     f"{'-' if lw is None else f'{lw:.0f}'} | {rel} | {r.get('block_refit_s', 0):.0f} | {loss} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="dense,sgpt50,r50mask,r50,r50+b4", help="comma list of row specs")
    ap.add_argument("--num-samples", type=int, default=64, help="calibration blocks (first N of the 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rerun rows already recorded under --key")
    ap.add_argument("--record", default=str(ROOT / "docs" / "bench_block.json"), help="merged record file")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_block.json"), help="this run's raw result")
    ap.add_argument("--key", default=None, help="record key (default calib_<num-samples>)")
    ap.add_argument("--report", action="store_true", help="print the recorded table and exit")
    ap.add_argument("--ref-key", help="--report: times relative to the sgpt50 row of this record key")
    args = ap.parse_args(argv)
    args.key = args.key or f"calib_{args.num_samples}"
    if args.report:
        ref = result_of(args.record, args.ref_key)["rows"]["sgpt50"] if args.ref_key else None
        print(table(result_of(args.record, args.key), ref))
        return 0
    specs = split_rows(args.rows)
    for s in specs:  # every spec checked, its values by PruneConfig, before the model is loaded
        if (kw := row_config(s)) is not None:
            PruneConfig(threads=args.threads, **kw)
    proto, ood, stats = protocol_with_ood(args.num_samples, args.threads)
    result = result_of(args.record, args.key, default={"rows": {}})
    result["protocol"] = {"model": proto.job.model, "calibration_blocks": len(proto.calib), "seq_len": 512,
                          "calibration_tokens_sha256": token_hash(proto.calib),
                          "eval_tokens_sha256": token_hash(proto.eval_blocks), "ood_tokens_sha256": token_hash(ood),
                          "ood": "32 x 512 of /usr/share/common-licenses", "threads": args.threads}  # fmt: skip
    for spec in specs:
        if spec in result["rows"] and not args.force:
            print(f"{spec}: recorded already (--force reruns it)", flush=True)
            continue
        row = one_row(spec, proto, stats, ood, args.threads)
        result["rows"][spec] = row
        save(args, result, append=True)
        print(f"{spec}: IMDB {row['ppl_imdb']:.2f}, ood {row['ppl_ood']:.2f}, layer-wise "
              f"{row.get('layer_wise_s', 0):.0f} s, block refit {row.get('block_refit_s', 0):.0f} s", flush=True)  # fmt: skip
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
