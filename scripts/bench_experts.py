"""Expert removal on a tiny MoE trained here: which expert importance keeps perplexity best (issue 24).

    nice -n 10 python scripts/train_tiny_moe.py                # first: out/tiny_moe/ (~12 min, 2 cores)
    nice -n 10 python scripts/bench_experts.py                 # the table, docs/bench_experts.json
    python scripts/bench_experts.py --smoke --record ''        # seconds: an untrained 2-layer MoE

No real MoE checkpoint is available offline, so the model is the tiny Mixtral scripts/train_tiny_moe.py
trains from a random init on IMDB reviews (see its docstring). Rows: the dense model, then for every
--keeps fraction of experts kept per layer and every --importances the library's
`shrink_(model, batches, StructureConfig(structure="experts", keep_experts=..., importance=...))` on a
fresh copy, plus `random` (experts chosen uniformly at random, seed 0: does an importance beat chance?).
The gradient importances (fisher, token_fisher, taylor) use their vector form, the gradient of removing
the expert as a whole. With --recover-steps, the first importance at the smallest keep is also trained
on afterwards with the library's `recover_` (LM loss), next to the dense model trained the same way.

Calibration: builtin:imdb split train, --calib-samples x --seq-len tokens (seed 0), batch 1. Evaluation:
held-out IMDB = --eval-samples windows of split test (seed 0); out-of-domain = as many windows of the
licence texts in /usr/share/common-licenses (scripts/bench_recovery.py's text). Recovery text: split
train in another order (seed 1, the order the model was trained on).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import transformers

from llm_gradprune.calibration.data import TextSource, load_samples, micro_batches
from llm_gradprune.evaluate import perplexity

try:
    from benchjson import ROOT, save
except ImportError:  # `python -m scripts.bench_experts` puts the root, not scripts/, on the path
    from scripts.benchjson import ROOT, save

IMPORTANCES = ("frequency", "reap", "fisher", "token_fisher", "taylor", "magnitude", "random")
GRADIENT = ("fisher", "token_fisher", "taylor")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=ROOT / "out" / "tiny_moe", help="scripts/train_tiny_moe.py's output"
    )
    ap.add_argument(
        "--keeps", default="0.5,0.75", help="fractions of experts kept per layer, comma-separated"
    )
    ap.add_argument("--importances", default=",".join(IMPORTANCES), help="comma-separated; random: chance")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration blocks (batch 1)")
    ap.add_argument("--eval-samples", type=int, default=32, help="held-out windows per domain")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per block")
    ap.add_argument(
        "--recover-steps", type=int, default=50, help="recovery steps after removal (0: no such row)"
    )
    ap.add_argument("--recover-lr", type=float, default=5e-4, help="recovery peak learning rate")
    ap.add_argument("--recover-batch", type=int, default=4, help="recovery blocks per step")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--smoke", action="store_true", help="an untrained 2-layer, 4-expert MoE, few short blocks"
    )
    ap.add_argument("--out", default="out/bench_experts.json", help="the raw result")
    ap.add_argument("--record", default="docs/bench_experts.json", help="merged record file ('' : none)")
    ap.add_argument("--key", default=None, help="the record's key (default threads_<--threads>)")
    args = ap.parse_args(argv)
    args.keeps = [float(k) for k in args.keeps.split(",") if k]  # none: the dense rows alone
    args.importances = args.importances.split(",")
    unknown = sorted(set(args.importances) - set(IMPORTANCES))
    if unknown:
        raise SystemExit(
            f"bench_experts: unknown importance {unknown[0]!r}: choose from {', '.join(IMPORTANCES)}"
        )
    if args.smoke:
        args.calib_samples, args.eval_samples, args.seq_len = 4, 4, 64
        args.recover_steps, args.recover_batch = min(args.recover_steps, 2), 2
    return args


def load_model(args):
    """(model, tokenizer, its training record or None): the trained tiny MoE, or an untrained smoke one."""
    if args.smoke:
        from train_tiny_moe import build, tokenizer
        from train_tiny_moe import parse_args as train_args

        tok = tokenizer()
        model = build(train_args(["--smoke", "--aux-coef", "0"]), tok)
        return model.eval(), tok, None
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"bench_experts: no model in {args.model}: run scripts/train_tiny_moe.py first")
    import json

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    record = args.model / "training.json"
    return model, tok, json.loads(record.read_text()) if record.is_file() else None


def texts(tok, args) -> dict[str, torch.Tensor]:
    from bench_recovery import LICENSES, ood_text

    def blocks(source: TextSource, n: int) -> torch.Tensor:
        return load_samples(source, tok, n, args.seq_len)

    return {
        "calib": blocks(TextSource("builtin:imdb", "train", seed=0), args.calib_samples),
        "imdb": blocks(TextSource("builtin:imdb", "test", seed=0), args.eval_samples),
        "ood": blocks(TextSource(str(ood_text(LICENSES)), "all", seed=0), args.eval_samples),
        "train": blocks(TextSource("builtin:imdb", "train", seed=1), args.recover_steps * args.recover_batch),
    }  # fmt: skip


def decoder_params(model) -> int:
    """Parameters of the decoder layers (embeddings, final norm and head are never removed)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in f".{n}")


def evaluate(model, data: dict) -> dict:
    return {
        "ppl_imdb": perplexity(model, data["imdb"], batch_size=4, progress=False)["ppl"],
        "ppl_ood": perplexity(model, data["ood"], batch_size=4, progress=False)["ppl"],
        "experts": model.config.num_local_experts,
        "top_k": model.config.num_experts_per_tok,
        "decoder_params": decoder_params(model),
    }  # fmt: skip


def register_random() -> None:
    """Add `random` to the library's importance registry: experts scored by torch.rand (the global seed),
    so the chance baseline goes through the same `shrink_` as every importance."""
    import dataclasses

    from llm_gradprune.structured import IMPORTANCES
    from llm_gradprune.structured.importance import Importance, LayerScores

    @dataclasses.dataclass(frozen=True)
    class Random(Importance):
        def scores(self, form, weights, geo, stats=None, unit=None) -> LayerScores:
            n = sum(e is not None for e in weights.experts)
            return LayerScores(experts=torch.rand(n, dtype=torch.float64))

    if "random" not in IMPORTANCES:
        IMPORTANCES.add(
            "random", Random("random", "experts chosen uniformly at random (a baseline)", ("experts",), False)
        )


def shrink_row(dense, data: dict, keep: float, importance: str) -> tuple[torch.nn.Module, dict]:
    """A copy of `dense` with experts removed by `importance`; its row (before evaluation)."""
    from llm_gradprune.structured import StructureConfig, shrink_

    model = copy.deepcopy(dense)
    torch.manual_seed(0)  # the random baseline's draw
    form = {"importance_form": "vector"} if importance in GRADIENT else {}
    cfg = StructureConfig(structure="experts", keep_experts=keep, importance=importance, **form)
    t = time.perf_counter()
    report = shrink_(model, micro_batches(data["calib"], 1), cfg, progress=False)
    seconds = time.perf_counter() - t
    return model, {"keep": keep, "importance": importance, "shrink_s": seconds,
                   "decoder_kept_report": report.get("decoder_kept"), "experts_kept": report.get("removed", {}).get("experts_kept"),
                   "timings": report.get("timings")}  # fmt: skip


def recover_row(model, data: dict, args) -> dict:
    """Train `model` in place with the library's recovery (LM loss); what it reported."""
    from llm_gradprune.recovery.config import RecoverConfig
    from llm_gradprune.recovery.trainer import recover_
    from llm_gradprune.targets import find_targets

    rec = RecoverConfig(steps=args.recover_steps, lr=args.recover_lr, batch_size=args.recover_batch,
                        seq_len=args.seq_len, seed=1, eval_every=0)  # fmt: skip
    t = time.perf_counter()
    torch.manual_seed(0)
    trained, report = recover_(model, micro_batches(data["train"], args.recover_batch), rec,
                               targets=find_targets(model), progress=False)  # fmt: skip
    assert trained is model  # full training (no LoRA) trains the weights in place
    return {"recover_steps": report["steps"], "recover_tokens": report["tokens"], "recover_s": time.perf_counter() - t,
            "recover_final_loss": report["final_loss"]}  # fmt: skip


def run_rows(dense, data: dict, args) -> dict:
    rows = {"dense": {"keep": 1.0, "importance": "-", "shrink_s": 0.0, **evaluate(dense, data)}}
    print(
        f"dense: IMDB {rows['dense']['ppl_imdb']:.2f}, out-of-domain {rows['dense']['ppl_ood']:.2f}",
        flush=True,
    )
    for keep in args.keeps:
        for imp in args.importances:
            model, row = shrink_row(dense, data, keep, imp)
            name = f"{imp} keep {keep:g}"
            rows[name] = {**row, **evaluate(model, data)}
            r = rows[name]
            print(f"{name}: {r['experts']} experts, IMDB {r['ppl_imdb']:.2f}, out-of-domain {r['ppl_ood']:.2f}, "
                  f"{r['shrink_s']:.1f} s", flush=True)  # fmt: skip
            if args.recover_steps and keep == min(args.keeps) and imp == args.importances[0]:
                rows[f"{name} + recovery"] = {
                    **row,
                    **recover_row(model, data, args),
                    **evaluate(model, data),
                }
            del model
    if args.recover_steps:
        model = copy.deepcopy(dense)
        rows["dense + recovery"] = {"keep": 1.0, "importance": "-", "shrink_s": 0.0, **recover_row(model, data, args),
                                    **evaluate(model, data)}  # fmt: skip
    return rows


def table(result: dict) -> str:
    rows, d = result["rows"], result["rows"]["dense"]
    lines = ["| row | experts kept | decoder params kept | IMDB ppl | / dense | out-of-domain ppl | / dense | shrink s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {r['experts']} of {d['experts']} | {r['decoder_params'] / d['decoder_params']:.3f} | "
                     f"{r['ppl_imdb']:.2f} | {r['ppl_imdb'] / d['ppl_imdb']:.3f} | {r['ppl_ood']:.2f} | "
                     f"{r['ppl_ood'] / d['ppl_ood']:.3f} | {r['shrink_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, tok, training = load_model(args)
    for p in dense.parameters():
        p.requires_grad_(False)
    data = texts(tok, args)
    register_random()
    t = time.perf_counter()
    rows = run_rows(dense, data, args)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model": "untrained smoke MoE" if args.smoke else str(args.model), "training": training and {
                  k: training[k] for k in ("args", "params", "train_tokens", "train_seconds", "held_out_loss")},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "wall_s": time.perf_counter() - t, "rows": rows}  # fmt: skip
    print(table(result))
    save(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
