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

Family shapes (issue 24): `speed --family NAME... | all` scales the configs of tests/families.py (llama,
qwen3, gemma3, phi3, mixtral, qwen2_moe, qwen3_moe) to `--hidden` (heads 64 wide, 4 query heads per KV
head, MLP 2.75x hidden, a routed expert half that, a shared expert the full width), `--layers` and
`--experts` (top-2), vocab 32000, random weights. Each is shrunk without calibration (magnitude, no
compensation): channels to 0.75 of the decoder parameters, then half the query heads (dense) or half
the experts (MoE), and timed against its dense model as above, every family in one process; the rows
go under `family_speed` (a run with other settings replaces them).

    nice -n 10 python scripts/bench_structured.py quality            # rows accumulate in docs/bench_structured.json
    nice -n 10 python scripts/bench_structured.py speed --model smollm2
    nice -n 10 python scripts/bench_structured.py speed --model tinyllama [--layers 22]
    nice -n 10 python scripts/bench_structured.py speed --family all --new-tokens 32 --reps 3 --threads 1
    python scripts/bench_structured.py report                        # the tables from the JSON

Recovery training is not part of this benchmark yet: `--recover MODULE:FUNCTION` applies
`FUNCTION(model, tokenizer, train_blocks)` to the dense model and to every shrunk one before
evaluation, and the rows then also hold `ppl_recovered` (the equally fine-tuned dense model is the
reference).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import importlib.util
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
    return result_of(args.json, args.key, default={})


def save_json(args, results: dict) -> None:
    """Every part (quality, speed per model) accumulates under one key, its command line kept with it."""
    record(args.json, args.key, [command_line()], results, append=True)


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
        dense, tok, vocab, stats = tinyllama(args.layers or 22), None, 32000, None
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
        m = measure(dense, pruned, args.reps, vocab, args.seq, args.new_tokens)
        s[k] = {**spec, **m, "shape": report["shape_after"], "decoder_kept": report["decoder_kept"],
                "params_total": report["params_after"]["total"], "file_bytes": file_bytes(pruned, tok)}  # fmt: skip
        print(
            f"{args.model} {k:90s} prefill x{m['prefill_speedup']:.3f} decode x{m['decode_speedup']:.3f}",
            flush=True,
        )
        save_json(args, results)
        del pruned
        gc.collect()


# -- speed across family shapes ---------------------------------------------------------------
# the families of tests/families.py timed here, by the name the table uses (llama: the untied one)
FAMILY_SHAPES = {"llama": "llama_untied", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3",
                 "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}  # fmt: skip
FAMILY_VOCAB = 32000
HEAD_DIM = 64
FAMILY_LAYERS = 6


def families_module():
    """tests/families.py, loaded by its path: a script run by path has only scripts/ on its import path."""
    spec = importlib.util.spec_from_file_location("bench_structured_families", ROOT / "tests" / "families.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building Family
    spec.loader.exec_module(module)
    return module


def scaled_config(config: dict, hidden: int, layers: int, experts: int) -> dict:
    """A tiny family config of tests/families.py at a benchmark size: the same keys, every size scaled.

    The dense MLP is 2.75x hidden (Llama's ratio), a routed expert half that and a shared expert the full
    width; heads are 64 wide with 4 query heads per KV head. `layer_types` goes, so the config derives
    its own layer pattern for `layers` (Gemma3: five sliding layers to one full)."""
    inter = hidden * 11 // 4
    heads = hidden // HEAD_DIM
    moe = "num_experts" in config or "num_local_experts" in config
    out = {k: v for k, v in config.items() if k not in ("layer_types", "no_rope_layers")}
    out |= {"vocab_size": FAMILY_VOCAB, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4),
            "max_position_embeddings": 4096,
            # Mixtral's experts read intermediate_size; the Qwen MoEs have a key of their own for them
            "intermediate_size": inter // 2 if moe and "moe_intermediate_size" not in config else inter}  # fmt: skip
    sized = {"head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 512,
             "num_experts": experts, "num_local_experts": experts, "moe_intermediate_size": inter // 2,
             "shared_expert_intermediate_size": inter}  # fmt: skip
    return out | {k: v for k, v in sized.items() if k in config}


def family_specs(moe: bool) -> list[dict]:
    """No calibration: magnitude importance, no compensation (random weights: speed is all that counts)."""
    second = (
        {"structure": "experts", "keep_experts": 0.5} if moe else {"structure": "heads", "keep_heads": 0.5}
    )
    base = {"importance": "magnitude", "compensate": "none"}
    return [{"structure": "channels", "target_params": 0.75, **base}, {**second, **base}]


def shape_text(shape: dict) -> str:
    """`L8 h16/4 I2816 E8`: layers, query/KV heads, each MLP width, routed experts."""
    short = {"intermediate_size": "I", "moe_intermediate_size": "moeI", "shared_expert_intermediate_size": "shI",
             "num_experts": "E", "num_local_experts": "E"}  # fmt: skip
    skip = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    rest = " ".join(f"{short.get(k, k)}{v}" for k, v in shape.items() if k not in skip)
    return (
        f"L{shape['num_hidden_layers']} h{shape['num_attention_heads']}/{shape['num_key_value_heads']} {rest}"
    )


def family_setup(dense) -> dict:
    units = find_units(dense)
    return {"config": {k: v for k, v in dense.config.to_diff_dict().items() if not isinstance(v, dict)},
            "shape": units.shape.to_dict(), "dense_params_total": sum(p.numel() for p in dense.parameters()),
            "dense_params_decoder": units.decoder_params()}  # fmt: skip


def speed_families(args) -> None:
    """Each family shape dense and shrunk, alternating, every family in this one process."""
    families = families_module().BY_NAME
    names = list(FAMILY_SHAPES) if "all" in args.family else args.family
    results = load_json(args)
    setup = {"hidden": args.hidden, "layers": args.layers or FAMILY_LAYERS, "experts": args.experts,
             "vocab": FAMILY_VOCAB, "seq": args.seq, "new_tokens": args.new_tokens, "reps": args.reps,
             "threads": torch.get_num_threads(), "cores": os.cpu_count(),
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}  # fmt: skip
    if results.get("family_speed", {}).get("setup") != setup:  # one table, one run's settings
        results["family_speed"] = {"setup": setup}
    fs = results["family_speed"]
    print(FAMILY_HEADER, flush=True)
    for name in names:
        fam = families[FAMILY_SHAPES[name]]
        config = scaled_config(fam.config, args.hidden, args.layers or FAMILY_LAYERS, args.experts)
        dense = dataclasses.replace(fam, config=config).build()
        for p in dense.parameters():
            p.requires_grad_(False)
        entry = fs.setdefault(name, {})
        entry["setup"] = family_setup(dense)
        for spec in family_specs(find_units(dense).shape.experts > 0):
            k = key(spec)
            pruned = copy.deepcopy(dense)
            try:
                report = shrink_(pruned, None, StructureConfig(**spec), progress=False)
            except Exception as e:  # a family the structured path refuses or breaks on is a finding
                entry[k] = {**spec, "error": f"{type(e).__name__}: {e}"}
                print(f"{name:9s} {k:70s} FAILED {entry[k]['error']}", flush=True)
                save_json(args, results)
                continue
            for p in pruned.parameters():
                p.requires_grad_(False)
            m = measure(dense, pruned, args.reps, FAMILY_VOCAB, args.seq, args.new_tokens)
            entry[k] = {**spec, **m, "shape": report["shape_after"], "decoder_kept": report["decoder_kept"],
                        "params_total": report["params_after"]["total"]}  # fmt: skip
            print(family_line(name, entry["setup"], entry[k]), flush=True)
            save_json(args, results)
            del pruned
            gc.collect()
        del dense
        gc.collect()


FAMILY_HEADER = (f"{'family':9s} {'remove':8s} {'kept':>5s} {'dense shape':28s}    {'shrunk shape':28s} "
                 f"{'prefill':>7s} {'shrunk':>7s} {'x':>6s} {'decode':>6s} {'shrunk':>6s} {'x':>6s}")  # fmt: skip


def family_line(name: str, setup: dict, r: dict) -> str:
    return (f"{name:9s} {r['structure']:8s} {r['decoder_kept']:5.3f} {shape_text(setup['shape']):28s} -> "
            f"{shape_text(r['shape']):28s} {r['dense_prefill_tps']:7.1f} {r['pruned_prefill_tps']:7.1f} "
            f"{r['prefill_speedup']:6.3f} {r['dense_decode_tps']:6.2f} {r['pruned_decode_tps']:6.2f} "
            f"{r['decode_speedup']:6.3f}")  # fmt: skip


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
    family_report(results.get("family_speed", {}))
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


def family_report(fs: dict) -> None:
    if not fs:
        return
    setup = fs["setup"]
    print(f"\nspeed across family shapes: hidden {setup['hidden']}, {setup['layers']} layers, {setup['experts']} "
          f"experts, prefill {setup['seq']} tokens, decode {setup['new_tokens']} tokens, best of {setup['reps']}")  # fmt: skip
    print(FAMILY_HEADER)
    for name, entry in fs.items():
        if name == "setup":
            continue
        for k, r in entry.items():
            if k == "setup":
                continue
            print(
                family_line(name, entry["setup"], r)
                if "error" not in r
                else f"{name:9s} {k} FAILED {r['error']}"
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["quality", "speed", "report"])
    ap.add_argument(
        "--rows", nargs="+", default=["main", "ablation", "sweep"], choices=["main", "ablation", "sweep"]
    )
    ap.add_argument("--model", choices=["smollm2", "tinyllama"], default="smollm2")
    ap.add_argument("--family", nargs="+", choices=[*FAMILY_SHAPES, "all"], default=None,
                    help="speed: time these family shapes (random, --hidden/--layers/--experts) instead of --model")  # fmt: skip
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="layers of the random model (TinyLlama: 22, family shapes: 6)",
    )
    ap.add_argument("--hidden", type=int, default=1024, help="family shapes: hidden size (heads are 64 wide)")
    ap.add_argument(
        "--experts", type=int, default=8, help="family shapes: routed experts per MoE layer (top-2)"
    )
    ap.add_argument("--seq", type=int, default=512, help="speed: tokens of the timed prefill forward")
    ap.add_argument("--new-tokens", type=int, default=128, help="speed: tokens generated in the timed decode")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per model (best is kept)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    ap.add_argument("--key", default="main", help="key of docs/bench_structured.json the results go under")
    ap.add_argument(
        "--json", type=Path, default=JSON, help="the results file (default docs/bench_structured.json)"
    )
    ap.add_argument(
        "--recover", default=None, help="MODULE:FUNCTION(model, tokenizer, train_blocks) run before eval"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    {"quality": quality, "speed": speed_families if args.family else speed, "report": report}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
