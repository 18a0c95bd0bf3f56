"""The cost of calibrating a tiny MoE against a dense model of the same total size (issue 22).

    nice -n 10 python scripts/bench_moe.py [--repeats 5 --threads 1 --samples 32 --seq-len 128]

It writes out/bench_moe.json (--out) and records it in docs/bench_moe.json under `threads_<--threads>` (--key).

Models (random weights, fp32, built in code, no Hub): a Mixtral (--hidden, --layers, --experts routed
top --top-k, --moe-inter per expert) and a dense Llama of the same attention, embeddings and depth whose
MLP intermediate size makes its total parameter count the nearest to the MoE's (experts x moe-inter
minus nothing but the router). The MoE's active parameters per token (attention, router, top-k experts,
embeddings) are reported too.

Calibration text: --samples random token ids of --seq-len (uniform over the vocab, one seed), in
micro-batches of --batch-size. Random text on random weights routes tokens about evenly: on a trained
model the router is skewed, which moves the per-expert work around but not its total.

Timed, wall seconds of `prune_` only (a fresh copy of the model per run, made beforehand), per path:
whole-model token_fisher row 50%, whole-model fisher row 50%, layer-wise sparsegpt 50%, wanda 2:4. Three
variants per path: `dense`, `moe` (experts are targets: per-expert statistics through the hook of
llm_gradprune/expert_calls.py, which makes the experts run their per-expert eager loop), and
`moe_noexp` (the same MoE with `--exclude experts`: only attention is pruned, the experts run as
configured, grouped_mm on CPU), which separates the cost of the per-expert hooks from the cost of the
MoE forward itself. Plus plain forward+backward of one micro-batch: dense, MoE as configured and MoE
with the eager experts. The variants alternate in one process (order reversed every repeat) and the
median of --repeats is reported with the ratios to dense: the machine is shared, so absolute seconds
mean something only inside one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

from llm_gradprune import PruneConfig, prune_

try:
    from benchjson import save
except ImportError:  # run as `python -m scripts.bench_moe`, which puts the root, not scripts/, on the path
    from scripts.benchjson import save

PATHS = {
    "token_fisher row 50%": {"criterion": "token_fisher", "sparsity": 0.5, "scope": "row"},
    "fisher row 50%": {"criterion": "fisher", "sparsity": 0.5, "scope": "row"},
    "sparsegpt 50% layer-wise": {"criterion": "sparsegpt", "sparsity": 0.5},
    "wanda 2:4": {"criterion": "wanda", "pattern": "2:4"},
}
VARIANTS = ("dense", "moe", "moe_noexp")
STEPS = ("dense", "moe", "moe_eager")


def configs(args) -> tuple[transformers.PretrainedConfig, transformers.PretrainedConfig]:
    """The MoE and the dense config with the nearest total size (the router is the only extra matrix)."""
    common = {
        "vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(256, args.seq_len), "tie_word_embeddings": False,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    moe = transformers.MixtralConfig(
        **common, intermediate_size=args.moe_inter, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )  # fmt: skip
    # the dense MLP holds 3 H I, the experts 3 H I_e E plus the H x E router; I a multiple of 8 so that
    # 2:4 fits down_proj's rows
    exact = (3 * args.hidden * args.moe_inter * args.experts + args.hidden * args.experts) / (3 * args.hidden)
    inter = 8 * max(1, round(exact / 8))
    return moe, transformers.LlamaConfig(**common, intermediate_size=inter)


def build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def sizes(moe: torch.nn.Module, dense: torch.nn.Module, args) -> dict:
    total = {k: sum(p.numel() for p in m.parameters()) for k, m in (("moe", moe), ("dense", dense))}
    per_expert = sum(p[0].numel() for n, p in moe.named_parameters() if ".experts." in n) // args.layers
    h, i, e = args.hidden, dense.config.intermediate_size, args.experts
    # fp32 in^2 per distinct input of a block (q/k/v share one, gate/up one; o_proj reads heads x head_dim = H)
    hessians = {"moe": 4 * (2 * h * h + e * (h * h + args.moe_inter**2)), "dense": 4 * (3 * h * h + i * i)}
    return {
        "params_moe": total["moe"], "params_dense": total["dense"],
        "params_dense_over_moe": total["dense"] / total["moe"],
        "active_params_moe": total["moe"] - args.layers * per_expert * (args.experts - args.top_k),
        "dense_intermediate": dense.config.intermediate_size, "hessian_bytes_per_layer": hessians,
    }  # fmt: skip


def prune_once(model: torch.nn.Module, cfg: PruneConfig, batches: list[torch.Tensor]) -> tuple[float, dict]:
    t = time.perf_counter()
    result = prune_(model, batches, cfg)
    seconds = time.perf_counter() - t
    r = result.report
    largest = max((r.get("hessian_bytes") or {}).get("per_tensor", {}).values(), default=0)
    return seconds, {"targets": r["targets"], "experts": r.get("experts"), "timings_s": r["timings_s"],
                     "largest_hessian_bytes": largest}  # fmt: skip


def step_once(model: torch.nn.Module, batch: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    return time.perf_counter() - t


def bench_paths(models: dict, batches: list[torch.Tensor], args) -> dict:
    runs = {p: {v: [] for v in VARIANTS} for p in PATHS}  # (seconds, info) per run
    for rep in range(args.repeats):
        for path, kw in PATHS.items():
            for v in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                exclude = ["experts"] if v == "moe_noexp" else []
                cfg = PruneConfig(**kw, exclude=exclude, threads=args.threads, progress=False)
                model = copy.deepcopy(models["dense" if v == "dense" else "moe"])
                runs[path][v].append(prune_once(model, cfg, batches))
                del model
                print(f"  repeat {rep} {path:26s} {v:10s} {runs[path][v][-1][0]:7.2f} s", flush=True)
    return {path: summarize(runs[path]) for path in PATHS}


def _calibration(timings: dict) -> float:
    """Seconds spent collecting statistics: all of prune_ but choosing the masks and updating weights."""
    return timings["total"] - timings["prune"] - timings["budgets"]


def summarize(runs: dict) -> dict:
    med = {v: statistics.median(s for s, _ in r) for v, r in runs.items()}
    calib = {v: statistics.median(_calibration(i["timings_s"]) for _, i in r) for v, r in runs.items()}
    last = {v: r[-1][1] for v, r in runs.items()}
    return {
        "median_seconds": med, "seconds": {v: [s for s, _ in r] for v, r in runs.items()},
        "moe_over_dense": med["moe"] / med["dense"], "moe_noexp_over_dense": med["moe_noexp"] / med["dense"],
        "moe_over_moe_noexp": med["moe"] / med["moe_noexp"],
        "median_calibration_seconds": calib, "calibration_moe_over_dense": calib["moe"] / calib["dense"],
        "calibration_moe_over_moe_noexp": calib["moe"] / calib["moe_noexp"],
        "targets": {v: i["targets"] for v, i in last.items()},
        "timings_s_last": {v: i["timings_s"] for v, i in last.items()},
        "largest_hessian_bytes": {v: i["largest_hessian_bytes"] for v, i in last.items()},
        "routed_tokens": _routed(last["moe"]["experts"]),
    }  # fmt: skip


def _routed(experts: dict | None) -> dict | None:
    """min/max routed tokens over the expert matrices, and how many got none (the report's section)."""
    if not experts:
        return None
    counts = [v for v in experts.get("routed_tokens", {}).values() if isinstance(v, int)]
    return {"min": min(counts, default=None), "max": max(counts, default=None),
            "unrouted": len(experts.get("unrouted", []))}  # fmt: skip


def bench_steps(models: dict, batch: torch.Tensor, args) -> dict:
    """Plain forward+backward of one micro-batch, no hooks: what running the MoE costs by itself."""
    eager = copy.deepcopy(models["moe"])
    eager.set_experts_implementation("eager")
    run = {"dense": models["dense"], "moe": models["moe"], "moe_eager": eager}
    times = {s: [] for s in STEPS}
    for m in run.values():
        step_once(m, batch)  # warm-up: first-call allocations
    for rep in range(max(3, args.repeats * 2)):
        for s in STEPS if rep % 2 == 0 else STEPS[::-1]:
            times[s].append(step_once(run[s], batch))
    med = {s: statistics.median(ts) for s, ts in times.items()}
    for m in run.values():
        m.zero_grad(set_to_none=True)
    return {"median_seconds": med, "seconds": times, "moe_over_dense": med["moe"] / med["dense"],
            "moe_eager_over_dense": med["moe_eager"] / med["dense"]}  # fmt: skip


def print_table(steps: dict, paths: dict) -> None:
    print(f"\n{'path':26s} {'dense s':>8s} {'moe s':>8s} {'noexp s':>8s} {'moe/dense':>9s} "
          f"{'noexp/dense':>11s} {'moe/noexp':>9s} {'calib m/d':>9s} {'calib m/n':>9s}")  # fmt: skip
    s = steps["median_seconds"]
    print(f"{'forward+backward (1 batch)':26s} {s['dense']:8.3f} {s['moe']:8.3f} {s['moe_eager']:8.3f} "
          f"{steps['moe_over_dense']:9.2f} {steps['moe_eager_over_dense']:11.2f}   (noexp column: eager experts)")  # fmt: skip
    for path, r in paths.items():
        m = r["median_seconds"]
        print(f"{path:26s} {m['dense']:8.2f} {m['moe']:8.2f} {m['moe_noexp']:8.2f} {r['moe_over_dense']:9.2f} "
              f"{r['moe_noexp_over_dense']:11.2f} {r['moe_over_moe_noexp']:9.2f} "
              f"{r['calibration_moe_over_dense']:9.2f} {r['calibration_moe_over_moe_noexp']:9.2f}")  # fmt: skip


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench_moe.json", help="the raw result")
    ap.add_argument("--record", default="docs/bench_moe.json", help="merged record file ('' : none)")
    ap.add_argument("--key", default=None, help="the record's key (default threads_<--threads>)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of both models")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of both models")
    ap.add_argument("--heads", type=int, default=8, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    ap.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    ap.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token")
    ap.add_argument("--moe-inter", type=int, default=512, help="intermediate size of one expert")
    ap.add_argument("--samples", type=int, default=32, help="calibration blocks of random token ids")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    ap.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch")
    ap.add_argument("--repeats", type=int, default=5, help="runs per variant; the median is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.layers < 2:  # one block is no repeated block list: the head would become a target
        raise SystemExit("bench_moe: --layers must be at least 2")
    torch.set_num_threads(args.threads)
    moe_cfg, dense_cfg = configs(args)
    models = {"moe": build(moe_cfg), "dense": build(dense_cfg)}
    size = sizes(models["moe"], models["dense"], args)
    print(f"MoE {size['params_moe']:,} parameters ({size['active_params_moe']:,} active per token), dense "
          f"{size['params_dense']:,} (intermediate {size['dense_intermediate']}, x{size['params_dense_over_moe']:.4f}); "
          f"experts as configured: {models['moe'].config._experts_implementation}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.samples, args.seq_len), generator=g)
    batches = list(ids.split(args.batch_size))
    steps = bench_steps(models, batches[0], args)
    paths = bench_paths(models, batches, args)
    print_table(steps, paths)
    result = {"args": vars(args), "threads": args.threads, "torch": torch.__version__,
              "transformers": transformers.__version__,
              "experts_implementation": models["moe"].config._experts_implementation,
              "sizes": size, "forward_backward": steps, "paths": paths}  # fmt: skip
    save(args, result)


if __name__ == "__main__":
    main()
