"""Structured pruning benchmark: quality on SmolLM2-135M, measured CPU speed on SmolLM2 and on a random
model of the TinyLlama-1.1B shape, at 10%, 25% and 40% fewer decoder parameters.

Quality follows scripts/protocol.py (64 x 512 calibration blocks of builtin:imdb train, 64 x 512
held-out windows of its test split). The per-weight statistics are the protocol's cached pass; the unit
statistics (removal gradients, input moments, block cosines) and the o_proj / down_proj input Hessians
come from one more pass of the library's loop, cached too. Each row is one `shrink_(copy, batches, cfg,
statistics=...)` call; the grid refits on the dense model's inputs (`refit_inputs: dense`, no extra
pass), a few rows compare the sequential refit and the mean bias.

Speed: for each shape, the shrunk and the dense model are timed alternately in one run, best of
`--reps`: prefill tokens/s of one 512-token forward, decode tokens/s of `generate` making 128 new
tokens (greedy, KV cache) after a 16-token prompt. The TinyLlama-shape model is random (its quality
means nothing): it is shrunk with magnitude (channels, heads), block_influence (layers) or fisher on two
random 128-token blocks (mixed), without refit, which does not change the shape.

    nice -n 10 python scripts/bench_structured.py quality            # rows accumulate in docs/bench_structured.json
    nice -n 10 python scripts/bench_structured.py speed --model smollm2
    nice -n 10 python scripts/bench_structured.py speed --model tinyllama [--layers 22]
    python scripts/bench_structured.py report                        # the tables from the JSON

Recovery training is not part of this benchmark yet: `--recover MODULE:FUNCTION` applies
`FUNCTION(model, tokenizer, train_blocks)` to the dense model and to every shrunk one before
evaluation, and the rows then also hold `ppl_recovered` (the equally fine-tuned dense model is the
reference).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchjson import command_line, record, result_of
from protocol import ROOT, Protocol, token_hash

from llm_gradprune.calibration.hessians import Hessians
from llm_gradprune.evaluate import perplexity
from llm_gradprune.io.stats_files import read_tensor_files, write_tensor_files
from llm_gradprune.structured import (
    StructureConfig,
    find_units,
    gather_unit_statistics,
    save_structured,
    shrink_,
)
from llm_gradprune.structured.unitstats import UnitStats, consumers

JSON = ROOT / "docs" / "bench_structured.json"
CACHE = ROOT / "out" / "bench_structured"
GRADIENT = ["fisher", "token_fisher", "taylor"]


def row(structure: str, importance: str, target: float, form: str | None = None, **kw) -> dict:
    return {"structure": structure, "importance": importance, "target_params": target,
            **({"importance_form": form} if form else {}), **kw}  # fmt: skip


def main_rows() -> list[dict]:
    """Every importance x structure at 25% fewer decoder parameters (heads: the nearest shape below 90%)."""
    forms = [(imp, f) for imp in GRADIENT for f in ("vector", "element")]
    rows = [row("channels", imp, 0.75, f) for imp, f in forms]
    rows += [row("channels", "magnitude", 0.75), row("channels", "flap", 0.75)]
    # element forms rank no layers any more (StructureConfig refuses them): their rows in the JSON are
    # the measurement that made it so
    rows += [row("layers", imp, 0.75, "vector") for imp in GRADIENT] + [
        row("layers", "block_influence", 0.75)
    ]
    rows += [row("mixed", imp, 0.75, f) for imp, f in forms]
    rows += [row("heads", imp, 0.9, f) for imp, f in forms]
    return rows + [row("heads", "magnitude", 0.9), row("heads", "flap", 0.9)]


def sweep_rows() -> list[dict]:
    rows = []
    for target in (0.9, 0.6):
        rows += [row("channels", "token_fisher", target, "vector"), row("channels", "magnitude", target),
                 row("channels", "flap", target), row("layers", "token_fisher", target, "vector"),
                 row("layers", "block_influence", target), row("mixed", "token_fisher", target, "vector")]  # fmt: skip
    return rows


def ablation() -> list[dict]:
    base = {
        "structure": "channels",
        "importance": "fisher",
        "importance_form": "vector",
        "target_params": 0.75,
    }
    return [{**base, "compensate": "none"}, {**base, "refit_inputs": "sequential"},
            {**base, "mean_bias": True}, {**base, "compensate": "none", "mean_bias": True},
            {"structure": "channels", "importance": "flap", "target_params": 0.75, "compensate": "none",
             "mean_bias": True},  # FLAP as published: fluctuation + mean bias, no refit
            {**base, "structure": "mixed", "refit_inputs": "sequential"}]  # fmt: skip


def key(spec: dict) -> str:
    return "/".join(f"{k}={v}" for k, v in sorted(spec.items()))


def load_json(args) -> dict:
    return result_of(JSON, args.key, default={})


def save_json(args, results: dict) -> None:
    """Every part (quality, speed per model) accumulates under one key, its command line kept with it."""
    record(JSON, args.key, [command_line()], results, append=True)


def file_bytes(model, tokenizer=None) -> int:
    folder = Path(tempfile.mkdtemp(prefix="bench_structured_", dir=CACHE))
    try:
        return save_structured(model, tokenizer, folder / "m")["bytes"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def unit_statistics(proto: Protocol):
    """The unit sums and o/down input Hessians of the dense model over the calibration blocks (cached)."""
    units = find_units(proto.model)
    folder = CACHE / f"units_{token_hash(proto.calib)[:12]}"
    unit = UnitStats(units.layers, units.shape, backward=True)
    hess = Hessians(consumers(units.layers))
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        for n, t in meta["hessian_shapes"].items():
            hess.sums[n], hess.tokens[n] = torch.zeros(t), 0
        read_tensor_files(folder, meta["files"], {**unit.tensors(), **hess.tensors()})
        unit.load_counters(meta["counters"])
        hess.load_counters(meta["hessian_counters"])
        return {"unit": unit, "hessian": hess}, meta["pass"]
    stats, counters = gather_unit_statistics(proto.model, proto.batches(), units.layers, units.shape,
                                             backward=True, hessians=True)  # fmt: skip
    unit, hess = stats.by_source["unit"], stats.by_source["hessian"]
    folder.mkdir(parents=True, exist_ok=True)
    files = write_tensor_files(folder, {**unit.tensors(), **hess.tensors()})
    meta = {"files": files, "counters": unit.counters(), "hessian_counters": hess.counters(), "pass": counters,
            "hessian_shapes": {n: list(t.shape) for n, t in hess.sums.items()}}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta, default=str))
    return {"unit": unit, "hessian": hess}, counters


def recover_hook(spec: str | None):
    if not spec:
        return None
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def quality(args) -> None:
    torch.manual_seed(0)
    proto = Protocol()
    stats = proto.statistics()
    extra, unit_pass = unit_statistics(proto)
    stats.by_source.update(extra)
    recover = recover_hook(args.recover)
    results = load_json(args)
    q = results.setdefault("quality", {})
    q["protocol"] = {"model": proto.job.model, "calibration_tokens_sha256": token_hash(proto.calib),
                     "eval_tokens_sha256": token_hash(proto.eval_blocks), "torch_threads": torch.get_num_threads(),
                     "unit_pass_seconds": unit_pass.get("seconds")}  # fmt: skip
    rows = q.setdefault("rows", {})

    def evaluate(model) -> dict:
        r = perplexity(model, proto.eval_blocks, batch_size=4, progress=False)
        out = {"ppl": r["ppl"], "eval_s": r["seconds"]}
        if recover is not None:
            recover(model, proto.tokenizer, proto.calib)
            out["ppl_recovered"] = perplexity(model, proto.eval_blocks, batch_size=4, progress=False)["ppl"]
        return out

    if "dense" not in q or args.force:
        units = find_units(proto.model)
        q["dense"] = {**evaluate(copy.deepcopy(proto.model) if recover else proto.model),
                      "params_total": sum(p.numel() for p in proto.model.parameters()),
                      "params_decoder": units.decoder_params(), "file_bytes": file_bytes(proto.model)}  # fmt: skip
        save_json(args, results)
    sets = {"main": main_rows, "ablation": ablation, "sweep": sweep_rows}
    specs = [spec for name in args.rows for spec in sets[name]()]
    for spec in specs:
        k = key(spec)
        if k in rows and not args.force:
            continue
        cfg = StructureConfig(**{"refit_inputs": "dense", **spec})
        model = copy.deepcopy(proto.model)
        report = shrink_(model, proto.batches(), cfg, statistics=stats, progress=False)
        r = evaluate(model)
        rows[k] = {**spec, **r, "refit_inputs": cfg.refit_inputs, "compensate": cfg.compensate,
                   "importance_form": cfg.importance_form, "shape": report["shape_after"],
                   "decoder_kept": report["decoder_kept"], "params_total": report["params_after"]["total"],
                   "file_bytes": file_bytes(model), "shrink_s": report["timings"]["shrink"],
                   "refit_error": report["compensation"]["error"].get("mean"),
                   "removed_error": report["compensation"]["removed_error"].get("mean"),
                   "removed_layers": report["removed"]["layers"]}  # fmt: skip
        print(f"{k:110s} ppl {r['ppl']:9.2f} kept {report['decoder_kept']:.3f}", flush=True)
        save_json(args, results)
        del model
        gc.collect()


# -- speed ------------------------------------------------------------------------------------
def tinyllama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
    with torch.device("cpu"):
        return LlamaForCausalLM(config).eval()


@torch.no_grad()
def time_once(model, prefill_ids, prompt, new_tokens: int) -> tuple[float, float]:
    t = time.perf_counter()
    model(input_ids=prefill_ids)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    decode = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return prefill, decode


def measure(dense, pruned, reps: int, vocab: int, seq: int = 512, new_tokens: int = 128) -> dict:
    """Best-of-`reps` prefill and decode tokens/s of both models, alternating (order flips each rep)."""
    g = torch.Generator().manual_seed(1)
    prefill_ids = torch.randint(0, vocab, (1, seq), generator=g)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)
    models = {"dense": dense, "pruned": pruned}
    for m in models.values():  # warm-up
        time_once(m, prefill_ids[:, :64], prompt, 4)
    best = {n: [float("inf"), float("inf")] for n in models}
    for r in range(reps):
        for n in ["dense", "pruned"] if r % 2 == 0 else ["pruned", "dense"]:
            p, d = time_once(models[n], prefill_ids, prompt, new_tokens)
            best[n] = [min(best[n][0], p), min(best[n][1], d)]
    out = {f"{n}_{what}": v for n in models for what, v in
           (("prefill_tps", seq / best[n][0]), ("decode_tps", new_tokens / best[n][1]))}  # fmt: skip
    out["prefill_speedup"] = out["pruned_prefill_tps"] / out["dense_prefill_tps"]
    out["decode_speedup"] = out["pruned_decode_tps"] / out["dense_decode_tps"]
    return out


def speed_specs(model_name: str) -> list[dict]:
    if model_name == "smollm2":  # the best gradient importance of the quality rows, per structure
        return [row("channels", "fisher", t, "vector") for t in (0.9, 0.75, 0.6)] + [
            row("heads", "token_fisher", 0.9, "vector"), row("layers", "token_fisher", 0.75, "vector"),
            row("mixed", "token_fisher", 0.75, "vector")]  # fmt: skip
    return [  # the 25% rows (the target) first
        row("channels", "magnitude", 0.75),
        row("layers", "block_influence", 0.75),
        row("mixed", "fisher", 0.75, "vector"),
        row("heads", "magnitude", 0.9),
        *(row("channels", "magnitude", t) for t in (0.9, 0.6)),
    ]


def speed(args) -> None:
    results = load_json(args)
    s = results.setdefault("speed", {}).setdefault(args.model, {})
    if args.model == "smollm2":
        proto = Protocol()
        dense, tok, vocab = proto.model, proto.tokenizer, proto.model.config.vocab_size
        stats = proto.statistics()
        extra, _ = unit_statistics(proto)
        stats.by_source.update(extra)
        batches = proto.batches()
        del proto.calib
    else:
        dense, tok, vocab, stats = tinyllama(args.layers), None, 32000, None
        batches = list(torch.randint(0, vocab, (2, 1, 128), generator=torch.Generator().manual_seed(0)))
    for p in dense.parameters():
        p.requires_grad_(False)
    units = find_units(dense)
    s["setup"] = {"layers": units.shape.layers, "threads": torch.get_num_threads(), "reps": args.reps,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "dense_params_total": sum(p.numel() for p in dense.parameters()),
                  "dense_params_decoder": units.decoder_params()}  # fmt: skip
    if "dense_file_bytes" not in s["setup"]:
        s["setup"]["dense_file_bytes"] = file_bytes(dense)
    for spec in speed_specs(args.model):
        k = key(spec)
        if k in s and not args.force:
            continue
        comp = {"refit_inputs": "dense"} if args.model == "smollm2" else {"compensate": "none"}
        pruned = copy.deepcopy(dense)
        report = shrink_(
            pruned, batches, StructureConfig(**{**comp, **spec}), statistics=stats, progress=False
        )
        for p in pruned.parameters():
            p.requires_grad_(False)
        m = measure(dense, pruned, args.reps, vocab)
        s[k] = {**spec, **m, "shape": report["shape_after"], "decoder_kept": report["decoder_kept"],
                "params_total": report["params_after"]["total"], "file_bytes": file_bytes(pruned, tok)}  # fmt: skip
        print(
            f"{args.model} {k:90s} prefill x{m['prefill_speedup']:.3f} decode x{m['decode_speedup']:.3f}",
            flush=True,
        )
        save_json(args, results)
        del pruned
        gc.collect()


# -- report -----------------------------------------------------------------------------------
def report(args) -> None:
    results = load_json(args)
    q = results.get("quality", {})
    dense = q.get("dense", {})
    print(
        f"dense SmolLM2-135M: ppl {dense.get('ppl', float('nan')):.2f}, {dense.get('params_total', 0) / 1e6:.1f}M params"
    )
    print(f"{'structure':9s} {'importance':16s} {'form':8s} {'kept':>5s} {'refit':10s} {'bias':5s} {'shape (L/I/H/kv)':17s}"
          f" {'params':>7s} {'MB':>6s} {'ppl':>9s} {'x dense':>7s}")  # fmt: skip
    for r in sorted(
        q.get("rows", {}).values(), key=lambda r: (-r["target_params"], r["structure"], r["ppl"])
    ):
        sh = r["shape"]
        shape = f"{sh['num_hidden_layers']}/{sh['intermediate_size']}/{sh['num_attention_heads']}/{sh['num_key_value_heads']}"
        refit = "none" if r["compensate"] == "none" else f"lsq-{r['refit_inputs'][:3]}"
        print(f"{r['structure']:9s} {r['importance']:16s} {str(r['importance_form'] or '-'):8s} {r['decoder_kept']:5.3f} "
              f"{refit:10s} {str(r.get('mean_bias', False))[:5]:5s} {shape:17s} {r['params_total'] / 1e6:7.1f} "
              f"{r['file_bytes'] / 1e6:6.0f} {r['ppl']:9.2f} {r['ppl'] / dense['ppl']:7.2f}")  # fmt: skip
    for name, s in results.get("speed", {}).items():
        setup = s.get("setup", {})
        print(
            f"\nspeed {name}: {setup.get('layers')} layers, {setup.get('threads')} threads, best of {setup.get('reps')}"
        )
        print(f"{'structure':9s} {'kept':>5s} {'shape (L/I/H/kv)':17s} {'params':>8s} {'MB':>6s} {'prefill t/s':>16s}"
              f" {'x':>6s} {'decode t/s':>14s} {'x':>6s}")  # fmt: skip
        for k, r in s.items():
            if k == "setup":
                continue
            sh = r["shape"]
            shape = f"{sh['num_hidden_layers']}/{sh['intermediate_size']}/{sh['num_attention_heads']}/{sh['num_key_value_heads']}"
            print(f"{r['structure']:9s} {r['decoder_kept']:5.3f} {shape:17s} {r['params_total'] / 1e6:8.1f} "
                  f"{r['file_bytes'] / 1e6:6.0f} {r['dense_prefill_tps']:7.1f}->{r['pruned_prefill_tps']:7.1f} "
                  f"{r['prefill_speedup']:6.3f} {r['dense_decode_tps']:6.2f}->{r['pruned_decode_tps']:6.2f} "
                  f"{r['decode_speedup']:6.3f}")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["quality", "speed", "report"])
    ap.add_argument(
        "--rows", nargs="+", default=["main", "ablation", "sweep"], choices=["main", "ablation", "sweep"]
    )
    ap.add_argument("--model", choices=["smollm2", "tinyllama"], default="smollm2")
    ap.add_argument("--layers", type=int, default=22, help="TinyLlama-shape layers (22 = the real shape)")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per model (best is kept)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    ap.add_argument("--key", default="main", help="key of docs/bench_structured.json the results go under")
    ap.add_argument(
        "--recover", default=None, help="MODULE:FUNCTION(model, tokenizer, train_blocks) run before eval"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    {"quality": quality, "speed": speed, "report": report}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
