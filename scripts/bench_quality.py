"""Quality benchmark: held-out perplexity of SmolLM2-135M pruned by every criterion.

Protocol (fixed): builtin:smollm2-135m in fp32; calibration = 64 blocks x 512 tokens of builtin:imdb
split train (seed 0), batch size 1 (one gradient sample per block); evaluation = 64 windows x 512 tokens
of builtin:imdb split test (seed 0); targets = every Linear in the decoder layers (210 tensors).

One pass of the library's calibration loop collects every whole-model statistic (sums of g, |g|, g^2 and
the per-token Fisher per weight, x^2 per input channel) and keeps it on disk (`scripts/protocol.py`), so
reruns skip it. The dense weights are restored between rows; each row is one
`prune_(model, None, cfg, statistics=...)` call, the library entry point a user's sweep calls.

Run (all default rows, then extras; results accumulate under `--key` (main) of docs/bench_quality.json,
finished rows are skipped):

    python scripts/bench_quality.py --rows main
    python scripts/bench_quality.py --rows nm
    python scripts/bench_quality.py --only wanda/row/0.5/owl fisher/row/0.3
    python scripts/bench_quality.py --report   # table into docs/BENCHMARKS.md + PNG

A row spec is CRITERION[:k=v,...]/SCOPE/SPARSITY_OR_N:M[/owl[:m=5,lam=0.08]], e.g.
`gblm:alpha=1000/row/0.5`, `blend:act=1,grad=0.25/row/2:4`, `wanda/row/0.5/owl`.
`--screen N` evaluates on N calibration blocks instead (a tuning signal that never reads held-out text).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from benchjson import command_line, record, result_of
from protocol import ROOT, Protocol, token_hash

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.config import parse_pattern
from llm_gradprune.evaluate import perplexity
from llm_gradprune.scoring.criteria import CRITERIA
from llm_gradprune.selection.masks import SCOPES

ROW_SETS = {
    "main": [
        "magnitude/tensor/0.5", "wanda/row/0.5", "gradient/tensor/0.5", "gradient/row/0.5",
        "taylor/row/0.5", "fisher/row/0.5", "gblm/row/0.5", "blend/row/0.5",
    ],
    "nm": ["magnitude/nm/2:4", "wanda/nm/2:4", "fisher/nm/2:4", "gblm/nm/2:4", "blend/nm/2:4"],
    "owl": ["wanda/row/0.5/owl", "fisher/row/0.5/owl", "gblm/row/0.5/owl", "blend/row/0.5/owl"],
    "sweep": ["wanda/row/0.3", "wanda/row/0.7", "blend/row/0.3", "blend/row/0.7",
              "magnitude/tensor/0.3", "magnitude/tensor/0.7"],
    "ria": ["ria/row/0.5", "ria/nm/2:4", "ria/tensor/0.5"],
}  # fmt: skip
OWL_NAMES = {"m": "m", "lam": "lambda"}


def parse_row(spec: str) -> dict:
    """A row spec as the config it stands for (see the module docstring)."""
    parts = spec.split("/")
    if len(parts) not in (3, 4):
        raise SystemExit(f"row spec {spec!r} must be CRITERION/SCOPE/SPARSITY[/owl]")
    crit, _, kv = parts[0].partition(":")
    params = {k: float(v) for k, _, v in (i.partition("=") for i in filter(None, kv.split(",")))}
    if crit not in CRITERIA:
        raise SystemExit(f"criterion {crit!r} in {spec!r} is unknown")
    nm = parse_pattern(parts[2]) if ":" in parts[2] else None
    alloc, owl = "uniform", {}
    if len(parts) == 4:
        alloc, _, kv = parts[3].partition(":")
        owl = {OWL_NAMES[k]: float(v) for k, _, v in (i.partition("=") for i in filter(None, kv.split(",")))}
    shape = {"pattern": parts[2]} if nm else {"scope": parts[1], "sparsity": float(parts[2])}
    return {"criterion": crit, "criterion_params": params, **shape, "allocation": alloc, "allocation_params": owl,
            "allow_empty_tensors": True}  # fmt: skip


def run(args) -> None:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared machine one thread beats two contended ones
    proto = Protocol(eval_seed=args.eval_seed)
    t = time.perf_counter()
    stats = proto.statistics(args.cache_dir)
    print(f"statistics ready in {time.perf_counter() - t:.0f} s", flush=True)

    results = result_of(args.json, args.key, default={})
    screen = args.screen
    eval_blocks = proto.calib[-screen:] if screen else proto.eval_blocks
    # other held-out window sets (--eval-seed) measure how much the protocol's own sample moves a row
    store_key = "screen" if screen else ("rows" if not args.eval_seed else f"rows_eval_seed_{args.eval_seed}")
    store = results.setdefault(store_key, {})
    meta = results.setdefault("protocol" if store_key == "rows" else f"protocol_{store_key}", {})
    meta.update({"model": proto.job.model, "calibration_tokens_sha256": token_hash(proto.calib),
                 "eval_tokens_sha256": token_hash(proto.eval_blocks), "eval_batch_size": args.eval_batch_size,
                 "targets": len(proto.targets), "target_weights": sum(w.numel() for w in proto.dense.values()),
                 "torch_threads": torch.get_num_threads()})  # fmt: skip

    def evaluate(label: str) -> dict:
        r = perplexity(proto.model, eval_blocks, batch_size=args.eval_batch_size, progress=False)
        print(f"{label:45s} ppl {r['ppl']:10.3f}  ({r['seconds']:.0f} s eval)", flush=True)
        return r

    specs = [s for name in args.rows for s in ROW_SETS[name]] + list(args.only)
    if "dense" not in store or args.force:
        proto.restore_dense_()
        r = evaluate("dense")
        store["dense"] = {"ppl": r["ppl"], "eval_s": r["seconds"], "achieved_sparsity": 0.0}
        save(args, results)
    for spec in specs:
        if spec in store and not args.force:
            print(f"{spec:45s} ppl {store[spec]['ppl']:10.3f}  (cached)", flush=True)
            continue
        cfg = PruneConfig(progress=False, **parse_row(spec))
        proto.restore_dense_()
        t = time.perf_counter()
        report = prune_(
            proto.model, None, cfg, targets=proto.targets, statistics=stats, return_masks=False
        ).report
        prune_s = time.perf_counter() - t
        r = evaluate(spec)
        store[spec] = {"criterion": cfg.criterion, "params": report["criterion_params"],
                       "scope": cfg.scope or "n:m", "sparsity": cfg.sparsity, "allocation": cfg.allocation,
                       "pattern": cfg.pattern, "ppl": r["ppl"], "prune_s": prune_s, "eval_s": r["seconds"],
                       "achieved_sparsity": report["overall_sparsity"],
                       **({"owl_layers": report["allocation"]} if report["allocation"] else {})}  # fmt: skip
        save(args, results)


def save(args, results: dict) -> None:
    """Rows accumulate over several runs under one key: every run's command line is kept with them."""
    record(args.json, args.key, [command_line()], results, append=True)


# -- report -----------------------------------------------------------------------------------
def table(rows: dict) -> str:
    lines = ["| row | criterion | params | scope | pattern | allocation | achieved sparsity | held-out ppl "
             "| prune s | eval s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for spec, r in rows.items():
        if spec == "dense":
            lines.append(f"| dense | - | - | - | - | - | 0 | {r['ppl']:.2f} | - | {r['eval_s']:.0f} |")
            continue
        params = ", ".join(f"{k}={v:g}" for k, v in r["params"].items()) or "-"
        lines.append(
            f"| `{spec}` | {r['criterion']} | {params} | {r['scope'] if r['pattern'] == 'unstructured' else 'n:m'} "
            f"| {r['pattern']} | {r['allocation']} | {r['achieved_sparsity']:.4f} | {r['ppl']:.2f} "
            f"| {r['prune_s']:.1f} | {r['eval_s']:.0f} |"
        )
    return "\n".join(lines)


def pivot(rows: dict) -> str:
    """Criterion x scope at 50% unstructured (uniform), plus 2:4; then the sparsity sweep."""

    def cell(spec: str) -> str:
        return f"{rows[spec]['ppl']:,.2f}" if spec in rows else "-"

    crits = sorted({r["criterion"] for k, r in rows.items() if k != "dense"})
    SCOPE_NAMES = SCOPES.names()
    out = ["| criterion | per tensor 50% | per row 50% | global 50% | 2:4 |", "|---|---|---|---|---|"]
    for c in crits:
        out.append(
            f"| {c} | "
            + " | ".join(cell(f"{c}/{s}/0.5") for s in SCOPE_NAMES)
            + f" | {cell(f'{c}/nm/2:4')} |"
        )
    sweep: dict[str, dict[float, float]] = {}
    for k, r in rows.items():
        if (
            k != "dense"
            and r["pattern"] == "unstructured"
            and r["allocation"] == "uniform"
            and not r["params"]
        ):
            sweep.setdefault(f"{r['criterion']}/{r['scope']}", {})[r["sparsity"]] = r["ppl"]
    levels = sorted({s for v in sweep.values() for s in v})
    out += ["", "| sweep | " + " | ".join(f"{s:.0%}" for s in levels) + " |", "|---|" + "---|" * len(levels)]
    for name, v in sorted(sweep.items()):
        if len(v) > 1:
            out.append(f"| {name} | " + " | ".join(f"{v[s]:,.2f}" if s in v else "-" for s in levels) + " |")
    return "\n".join(out)


def seed_table(results: dict) -> str:
    """Rows measured on other held-out samples (--eval-seed): how much the protocol's own sample moves them."""
    stores = {0: results["rows"]} | {
        int(k.rsplit("_", 1)[1]): v for k, v in results.items() if k.startswith("rows_eval_seed_")
    }
    specs = [k for k in results["rows"] if k != "dense" and all(k in v for v in stores.values())]
    if len(stores) < 2 or not specs:
        return ""
    out = ["| held-out sample | dense | " + " | ".join(f"`{k}` (/ dense)" for k in specs) + " |",
           "|---|---|" + "---|" * len(specs)]  # fmt: skip
    for seed, v in sorted(stores.items()):
        d = v["dense"]["ppl"]
        out.append(
            f"| seed {seed} | {d:.2f} | "
            + " | ".join(f"{v[k]['ppl']:.2f} ({v[k]['ppl'] / d:.2f})" for k in specs)
            + " |"
        )
    return "\n".join(out)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for spec, r in rows.items():
        if spec == "dense" or r["pattern"] != "unstructured" or r["allocation"] != "uniform" or r["params"]:
            continue
        curves.setdefault(f"{r['criterion']}/{r['scope']}", []).append((r["sparsity"], r["ppl"]))
    curves = {k: v for k, v in curves.items() if len(v) > 1}  # single 50% points live in the tables
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, pts in sorted(curves.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if "dense" in rows:
        ax.axhline(rows["dense"]["ppl"], color="grey", ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of target weights")
    ax.set_ylabel("held-out IMDB perplexity (log)")
    ax.set_title("SmolLM2-135M, 64x512 calibration / 64x512 held-out")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


START, END = "<!-- bench_quality:start -->", "<!-- bench_quality:end -->"


def report(args) -> None:
    results = result_of(args.json, args.key)
    ordered = dict(sorted(results["rows"].items(), key=lambda kv: (
        kv[0] != "dense", kv[1].get("pattern", ""), kv[1].get("sparsity", 0), kv[1].get("allocation", ""),
        kv[1].get("criterion", ""), kv[1].get("scope", ""))))  # fmt: skip
    text = "\n\n".join(t for t in (pivot(results["rows"]), seed_table(results), table(ordered)) if t)
    print(text)
    if results.get("screen"):
        print("\nscreen (calibration-block perplexity):")
        for spec, r in results["screen"].items():
            print(f"  {spec:45s} {r['ppl']:.3f}")
    plot(results["rows"], args.png)
    print(f"wrote {args.png}")
    if args.markdown:
        md = args.markdown.read_text() if args.markdown.exists() else "# Benchmarks\n"
        intro = args.intro.read_text().strip() if args.intro and args.intro.exists() else ""
        block = f"{START}\n{intro}\n\n{text}\n{END}"
        if START in md:
            md = md[: md.index(START)] + block + md[md.index(END) + len(END) :]
        else:
            md = md.rstrip() + "\n\n" + block + "\n"
        args.markdown.write_text(md)
        print(f"wrote the table into {args.markdown}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", default=[], choices=sorted(ROW_SETS), help="named row sets")
    p.add_argument("--only", nargs="*", default=[], help="row specs to run (see docstring)")
    p.add_argument("--force", action="store_true", help="rerun rows already in the JSON")
    p.add_argument("--screen", type=int, default=0, help="evaluate on the last N calibration blocks")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--eval-seed", type=int, default=0, help="held-out window sample (0: the protocol's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--json", type=Path, default=ROOT / "docs" / "bench_quality.json", help="merged record file"
    )
    p.add_argument("--key", default="main", help="the record's key the rows accumulate under")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "bench_quality.png")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "out" / "bench_quality")
    p.add_argument("--report", action="store_true", help="only print the table and write the PNG")
    p.add_argument("--markdown", type=Path, default=None, help="with --report: put the table in this file")
    p.add_argument("--intro", type=Path, default=None, help="with --markdown: text placed above the table")
    args = p.parse_args(argv)
    if args.report:
        report(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
