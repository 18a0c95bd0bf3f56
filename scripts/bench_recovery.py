"""Recovery benchmark: what masked retraining wins back, against a dense model fine-tuned the same way.

    nohup nice -n 10 python scripts/bench_recovery.py --rows all --steps 200 > rec.log 2>&1 &
    python scripts/bench_recovery.py --report   # the table ([--key lr_3e-4]: another run's)

Protocol: builtin:smollm2-135m fp32 (the quality protocol of scripts/protocol.py): held-out IMDB = 64
windows x 512 tokens of builtin:imdb split test (seed 0); out-of-domain = 32 windows x 512 tokens of the
licence texts in /usr/share/common-licenses (legal English prose, never trained on), where recovery
must not overfit to IMDB. Training text = builtin:imdb split train in another order (seed 1), so no
held-out review is trained on. Every trained row uses the same steps, batch (1 x 512 tokens), learning
rate (1e-4 peak, 10% warm-up, cosine) and text; the fair reference is the dense model fine-tuned so.

Rows (each in its own process, so its peak memory is its own; results merged into the JSON):
  dense, dense-ft               the dense model, and fine-tuned with the recovery settings
  r50, r50+lm, r50+kd           configs/recipe_50.yaml one-shot, + recovery (LM loss), + distillation
  r24, r24+lm, r24+kd, r24+lora the 2:4 recipe the same, and LoRA (r 16) instead of full recovery
  p70, p70x4, p70x4+rec         70% (fisher, global): one-shot, 4 cubic rounds, 4 rounds with
                                --round-steps of recovery between them
  s75, s75+lm                   structured: 25% fewer decoder parameters (MLP channels, token_fisher
                                vector importance, lsq refit on the dense inputs: the best row of
                                scripts/bench_structured.py), then + recovery (LM loss)
The recipe rows start from the recipes' checkpoints (`--pruned-50`, `--pruned-24`: run the recipe
configs first, e.g. `llm-gradprune prune --config configs/recipe_50.yaml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchjson import command_line, record, result_of
from protocol import ROOT, Protocol

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.calibration.data import TextSource, load_samples, micro_batches, token_hash
from llm_gradprune.evaluate import perplexity
from llm_gradprune.job.inputs import text_source
from llm_gradprune.recovery.config import RecoverConfig
from llm_gradprune.recovery.trainer import recover_
from llm_gradprune.rounds import prune_in_rounds_
from llm_gradprune.targets import find_targets

ROWS = ["dense", "dense-ft", "r50", "r50+lm", "r50+kd", "r24", "r24+lm", "r24+kd", "r24+lora", "p70", "p70x4",
        "p70x4+rec", "s75", "s75+lm"]  # fmt: skip
LICENSES = Path("/usr/share/common-licenses")


def protocol_with_ood(num_samples: int, threads: int):
    """(protocol with its first `num_samples` calibration blocks, 32 x 512 out-of-domain windows, its
    whole-model statistics): the setup the block-level benchmarks share."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    proto = Protocol()
    proto.calib = proto.calib[:num_samples]
    ood = load_samples(TextSource(str(ood_text(LICENSES)), split="all"), proto.tokenizer, 32, 512)
    t = time.perf_counter()
    stats = proto.statistics()
    print(f"statistics over {len(proto.calib)} blocks ready in {time.perf_counter() - t:.0f} s", flush=True)
    return proto, ood, stats


def ood_text(folder: Path) -> Path:
    """The licence texts as one paragraph per line (a local .txt the library reads)."""
    out = ROOT / "out" / "bench_recovery" / "licenses.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    paragraphs = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.is_symlink():
            text = p.read_text(encoding="utf-8", errors="replace")
            paragraphs += [" ".join(x.split()) for x in text.split("\n\n") if x.strip()]
    out.write_text("\n".join(paragraphs) + "\n")
    return out


def load_pruned(path: str, proto: Protocol) -> None:
    """Put a pruned checkpoint's target weights into the protocol's model."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no checkpoint in {path}: run the recipe config first")
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), "pt") as fh:
                for name, m in proto.targets.items():
                    if f"{name}.weight" in fh.keys():
                        m.weight.copy_(fh.get_tensor(f"{name}.weight"))


def one_row(row: str, args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    proto = Protocol()
    model = proto.model
    ood = load_samples(TextSource(str(ood_text(LICENSES)), split="all"), proto.tokenizer, 32, 512)  # fmt: skip
    rec = RecoverConfig(steps=args.steps, lr=args.lr, batch_size=1, seq_len=512, seed=1, eval_every=0,
                        distill_alpha=1.0 if row.endswith("+kd") else 0.0, lora_r=16 if row.endswith("+lora") else 0,
                        round_steps=args.round_steps)  # fmt: skip
    job = dataclasses.replace(
        proto.job, recover=rec, prune=dataclasses.replace(proto.job.prune, progress=False)
    )
    n_train = max(args.steps, args.round_steps * 3)
    train = micro_batches(load_samples(text_source(job, seed=1), proto.tokenizer, n_train, 512), 1)
    out: dict = {"row": row, "train_tokens_sha256": token_hash(torch.cat(train)), "steps": 0}
    t0 = time.perf_counter()
    if row.startswith("r50"):
        load_pruned(args.pruned_50, proto)
    elif row.startswith("r24"):
        load_pruned(args.pruned_24, proto)
    elif row == "p70":
        prune_(model, proto.batches(), PruneConfig(criterion="fisher", scope="global", sparsity=0.7, progress=False),
               targets=proto.targets)  # fmt: skip
    elif row.startswith("p70x4"):
        cfg = PruneConfig(criterion="fisher", scope="global", sparsity=0.7, rounds=4, progress=False)
        result = prune_in_rounds_(model, proto.batches(), cfg, targets=proto.targets, recover=rec,
                                  recover_batches=train if row.endswith("+rec") else None)  # fmt: skip
        out["rounds"] = result.report["rounds"]
    elif row.startswith("s75"):
        from bench_structured import unit_statistics

        from llm_gradprune.structured import StructureConfig, shrink_

        stats = proto.statistics()
        stats.by_source.update(unit_statistics(proto)[0])
        params = sum(p.numel() for p in model.parameters())
        report = shrink_(model, proto.batches(), StructureConfig(structure="channels", target_params=0.75,
                         importance="token_fisher", refit_inputs="dense"), statistics=stats, progress=False)  # fmt: skip
        out.update(decoder_kept=report["decoder_kept"], shape=report["shape_after"],
                   params_kept=sum(p.numel() for p in model.parameters()) / params)  # fmt: skip
        proto.targets = find_targets(model)  # the shrunk layers are new modules
    out["prune_s"] = time.perf_counter() - t0
    zeros = sum(int((m.weight == 0).sum()) for m in proto.targets.values())
    out["sparsity"] = zeros / sum(m.weight.numel() for m in proto.targets.values())
    if row in ("dense-ft",) or row.endswith(("+lm", "+kd", "+lora")):
        teacher = None
        if rec.distills:
            from llm_gradprune.models import load_model

            teacher, _, _ = load_model("builtin:smollm2-135m")
        t = time.perf_counter()
        model, report = recover_(model, train, rec, teacher=teacher, targets=proto.targets, progress=True)
        out.update(steps=report["steps"], train_s=time.perf_counter() - t, train_tokens=report["tokens"],
                   final_loss=report["final_loss"], pruned_kept_zero=report["pruned_kept_zero"])  # fmt: skip
    out["ppl_imdb"] = perplexity(model, proto.eval_blocks, batch_size=4, progress=False)["ppl"]
    out["ppl_ood"] = perplexity(model, ood, batch_size=4, progress=False)["ppl"]
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["wall_s"] = time.perf_counter() - t0
    out["threads"] = torch.get_num_threads()
    return out


def table(results: dict) -> str:
    rows = results["rows"]
    ft = rows.get("dense-ft", {})
    head = "| row | sparsity | steps | tokens | IMDB ppl | / dense-ft | out-of-domain ppl | / dense-ft | train s | peak RSS GB |"
    lines = [head, "|---" * 10 + "|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        rel = f"{r['ppl_imdb'] / ft['ppl_imdb']:.3f}" if ft else "-"
        rel_ood = f"{r['ppl_ood'] / ft['ppl_ood']:.3f}" if ft else "-"
        lines.append(f"| `{name}` | {r['sparsity']:.3f} | {r['steps']} | {r.get('train_tokens', 0):,} | "
                     f"{r['ppl_imdb']:.2f} | {rel} | {r['ppl_ood']:.2f} | {rel_ood} | {r.get('train_s', 0):.0f} | "
                     f"{r['peak_rss_bytes'] / 1e9:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help=f"comma-separated of {', '.join(ROWS)}, or all")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--round-steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pruned-50", default=str(ROOT / "out" / "smollm2-135m-fisher-global-lsq-50"))
    ap.add_argument("--pruned-24", default=str(ROOT / "out" / "smollm2-135m-sparsegpt-ts-lsq-2of4"))
    ap.add_argument(
        "--json", type=Path, default=ROOT / "docs" / "bench_recovery.json", help="merged record file"
    )
    ap.add_argument("--key", default="lr_1e-4", help="the record's key the rows are merged under")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_row(args.one, args)))
        return 0
    if args.report:
        print(table(result_of(args.json, args.key)))
        return 0
    rows = ROWS if args.rows == "all" else args.rows.split(",")
    for row in rows:
        cmd = [sys.executable, __file__, "--one", row, "--steps", str(args.steps), "--round-steps", str(args.round_steps),
               "--lr", str(args.lr), "--threads", str(args.threads), "--pruned-50", args.pruned_50,
               "--pruned-24", args.pruned_24]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{row}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results = result_of(args.json, args.key, default={"rows": {}})
        results["protocol"] = {"steps": args.steps, "round_steps": args.round_steps, "lr": args.lr, "batch": "1 x 512",
                               "threads": args.threads, "command": " ".join(sys.argv)}  # fmt: skip
        results["rows"][row] = r
        record(args.json, args.key, [command_line()], results, append=True)
        print(
            f"{row}: IMDB {r['ppl_imdb']:.2f}, out-of-domain {r['ppl_ood']:.2f}, {r['wall_s']:.0f} s",
            flush=True,
        )
    print(table(result_of(args.json, args.key)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
