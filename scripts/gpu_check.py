"""One GPU, one JSON: calibration cost, pruning times and 2:4 sparse matmuls (run by scripts/gpu_check.sh).

    python scripts/gpu_check.py --out gpu_check.json              # on a GPU, < 8 min
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check.json  # CPU, seconds

Model: random weights of the TinyLlama-1.1B shape (hidden 2048, intermediate 5632, GQA 32/4, vocab
32000) with --layers of its 22 layers, random token blocks: speed and memory need no trained weights,
and nothing has to be downloaded. --dry-run runs every code path on a tiny random Llama on the CPU
and marks what needs a GPU as skipped.

1. calibration, bf16 model, statistics on the CPU (stats_device cpu): tokens/s and peak device memory
   of our loop (`calibrate`, fisher sums) against a plain forward+backward loop whose target weights
   keep their gradients; repeats alternate. Targets: memory <= 1.05x, tokens/s >= 0.95x.
2. pruning times through `prune_`: sparsegpt 50% and 2:4, the two recipes (fisher global + lsq;
   sparsegpt 2:4 true_sequential + lsq; each with its block refit, 4 passes with a step per
   micro-batch), the block-local criteria regional and block_fisher, and sparsegpt with 16 block-refit
   steps and with 4 passes of a step per micro-batch (each also as a multiple of the sparsegpt 50%
   time); llm-compressor's SparseGPT 50% and 2:4 on the same blocks if `llmcompressor` imports, else
   skipped.
3. the sparsegpt 2:4 checkpoint, saved and read back: every target is checked to be 2:4, and each
   distinct weight shape runs through torch.sparse.to_sparse_semi_structured: matmul time against the
   dense weight and the largest difference of the products.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
from protocol import recipe_settings

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.calibration.loop import calibrate, causal_lm_loss
from llm_gradprune.calibration.stats import make_statistics
from llm_gradprune.targets import find_targets

SHAPES = {
    "gpu": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
            "vocab_size": 32000},
    "dry": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256},
}  # fmt: skip


class Clock:
    """Wall time with the device drained at both ends, and the device's peak memory since `start`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()

    def stop(self) -> tuple[float, float | None]:
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        return time.perf_counter() - self.t, peak


def build(kind: str, layers: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[kind], num_hidden_layers=layers, max_position_embeddings=4096,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def calibration(model, batches, device, repeats: int) -> dict:
    targets = find_targets(model)
    clock, tokens = Clock(device), sum(b.numel() for b in batches[1:])
    runs: dict[str, list[tuple[float, float | None]]] = {"plain": [], "ours": []}

    def plain():
        for m in targets.values():
            m.weight.requires_grad_(True)
        causal_lm_loss(model, batches[0]).backward()  # warm-up
        clock.start()
        for b in batches[1:]:
            causal_lm_loss(model, b).backward()  # gradients accumulate in .grad and stay
        out = clock.stop()
        for m in targets.values():
            m.weight.grad = None
            m.weight.requires_grad_(False)
        return out

    def ours():
        stats = make_statistics({"grad_sq_mean"}, targets, device="cpu")
        calibrate(model, batches[:1], stats, progress=False)  # warm-up (pinned buffers, kernels)
        clock.start()
        calibrate(model, batches[1:], stats, progress=False)
        return clock.stop()

    for rep in range(repeats):  # alternate: drift in the machine's state hits both
        for name in ("plain", "ours") if rep % 2 == 0 else ("ours", "plain"):
            runs[name].append((plain if name == "plain" else ours)())
    best = {v: min(r, key=lambda x: x[0]) for v, r in runs.items()}
    out = {v: {"tokens_per_s": tokens / s, "peak_device_mb": m, "all_seconds": [x[0] for x in runs[v]]}
           for v, (s, m) in best.items()}  # fmt: skip
    out["speed_ratio"] = out["ours"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    if device.type == "cuda":
        out["memory_ratio"] = best["ours"][1] / best["plain"][1]
        out["targets_met"] = {
            "memory_le_1.05x": out["memory_ratio"] <= 1.05,
            "speed_ge_0.95x": out["speed_ratio"] >= 0.95,
        }
    else:
        out["memory_ratio"] = "skipped: no GPU (peak device memory)"
    return out


OUR_RUNS = {
    "sparsegpt-50": {"criterion": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-2:4": {"criterion": "sparsegpt", "pattern": "2:4"},
    # the shipped configs' pruning settings, so this check times the recipes as users run them
    "recipe_50": {**recipe_settings("recipe_50"), "stats_device": "cpu"},
    "recipe_2of4": recipe_settings("recipe_2of4"),
    # issue 26: the block-local gradient criterion and the block refit, timed against sparsegpt-50
    "regional-50": {"criterion": "regional", "sparsity": 0.5},
    "block-fisher-50": {"criterion": "block_fisher", "scope": "row", "sparsity": 0.5},
    "sparsegpt-50+block16": {"criterion": "sparsegpt", "sparsity": 0.5, "block_steps": 16, "block_lr": 1e-3},
    "sparsegpt-50+block4x1": {
        "criterion": "sparsegpt",
        "sparsity": 0.5,
        "block_steps": 4,
        "block_lr": 1e-3,
        "block_batch": 1,
    },  # fmt: skip
}
AGAINST_SPARSEGPT = ("regional-50", "block-fisher-50", "sparsegpt-50+block16", "sparsegpt-50+block4x1")


def zeros(model) -> float:
    """Fraction of the target weights that are 0 (random weights have none before pruning)."""
    weights = [m.weight for m in find_targets(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def prune_times(make_model, batches, device, folder: Path) -> tuple[dict, Path | None]:
    clock, out, saved = Clock(device), {}, None
    for name, kw in OUR_RUNS.items():
        model = make_model()
        clock.start()
        prune_(model, batches, PruneConfig(**kw, progress=False), return_masks=False)
        seconds, peak = clock.stop()
        out[f"ours/{name}"] = {"seconds": seconds, "peak_device_mb": peak, "target_sparsity": zeros(model)}
        if name in AGAINST_SPARSEGPT:
            out[f"ours/{name}"]["x_sparsegpt-50"] = seconds / out["ours/sparsegpt-50"]["seconds"]
        if name == "sparsegpt-2:4":
            saved = folder / "sparsegpt-2of4"
            model.save_pretrained(saved)
        del model
    if importlib.util.find_spec("llmcompressor") is None:
        out["theirs"] = "skipped: llmcompressor is not importable here"
        return out, saved
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    ids = torch.cat([b.cpu() for b in batches])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    for name, mask in (("sparsegpt-50", "0:0"), ("sparsegpt-2:4", "2:4")):
        model = make_model()
        recipe = SparseGPTModifier(sparsity=0.5, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"],
                                   block_size=128, dampening_frac=0.01)  # fmt: skip
        clock.start()
        try:
            oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
                    max_seq_length=ids.shape[1], shuffle_calibration_samples=False)  # fmt: skip
            seconds, peak = clock.stop()
            out[f"theirs/{name}"] = {"seconds": seconds, "peak_device_mb": peak}
            out[f"ratio/{name}"] = out[f"ours/{name}"]["seconds"] / seconds
        except Exception as exc:  # report, keep the rest of the check
            out[f"theirs/{name}"] = (
                f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        del model
    return out, saved


def semi_structured(folder: Path | None, device, tokens: int) -> dict:
    from safetensors import safe_open

    if folder is None:
        return {"error": "no 2:4 checkpoint was written"}
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            weights.update(
                {k: fh.get_tensor(k) for k in fh.keys() if ".layers." in k and k.endswith("proj.weight")}
            )
    valid = all(bool(((w.reshape(-1, 4) != 0).sum(1) <= 2).all()) for w in weights.values())
    out = {"targets": len(weights), "all_2of4": valid}
    if device.type != "cuda":
        out["matmul"] = "skipped: torch.sparse.to_sparse_semi_structured needs a CUDA device"
        return out
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    shapes = {}
    for k, w in weights.items():
        shapes.setdefault(tuple(w.shape), (k, w))
    rows = {}
    for shape, (name, w) in shapes.items():
        W = w.to(device=device, dtype=torch.bfloat16)
        x = torch.randn(tokens, W.shape[1], device=device, dtype=torch.bfloat16)
        try:
            try:
                Ws = to_sparse_semi_structured(W)
                backend = "cusparselt" if not SparseSemiStructuredTensor._FORCE_CUTLASS else "cutlass"
            except Exception:
                SparseSemiStructuredTensor._FORCE_CUTLASS = True
                Ws, backend = to_sparse_semi_structured(W), "cutlass"
            times = {}
            for label, weight in (("dense", W), ("sparse", Ws)):
                for _ in range(3):
                    torch.nn.functional.linear(x, weight)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    y = torch.nn.functional.linear(x, weight)
                torch.cuda.synchronize()
                times[label] = (time.perf_counter() - t) / 20
                times[f"{label}_out"] = y
            diff = float((times.pop("dense_out").float() - times.pop("sparse_out").float()).abs().max())
            rows["x".join(map(str, shape))] = {"example": name, "backend": backend, "dense_ms": times["dense"] * 1e3,
                                               "sparse_ms": times["sparse"] * 1e3,
                                               "speedup": times["dense"] / times["sparse"], "max_abs_diff": diff}  # fmt: skip
        except Exception as exc:
            rows["x".join(map(str, shape))] = {
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            }
    out["matmul"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny random model on the CPU; GPU-only parts skipped"
    )
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8 on a GPU, 2 dry)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 2048, dry 32)")
    ap.add_argument("--batches", type=int, default=None, help="calibration blocks (default 32, dry 3)")
    ap.add_argument("--repeats", type=int, default=None, help="alternating repeats (default 3, dry 1)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    kind = "dry" if dry else "gpu"
    layers = args.layers or (2 if dry else 8)
    seq = args.seq_len or (32 if dry else 2048)
    n = args.batches or (3 if dry else 32)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, SHAPES[kind]["vocab_size"], (n, seq), generator=g)
    batches = [b.to(device) for b in blocks.split(1)]
    result = {"mode": "dry-run" if dry else "gpu", "device": torch.cuda.get_device_name() if not dry else "cpu",
              "torch": torch.__version__, "model": {"shape": SHAPES[kind], "layers": layers}, "seq_len": seq,
              "batches": n, "why_dry": None if not dry else ("--dry-run" if args.dry_run else "no CUDA device")}  # fmt: skip
    sections = {}

    def section(name, fn):
        t = time.perf_counter()
        try:
            sections[name] = fn()
        except Exception as exc:  # one line per failure; the other sections still run
            sections[name] = {
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            }
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)

    def calib():
        model = build(kind, layers, torch.bfloat16, device)
        return calibration(model, batches[: min(n, 9)], device, args.repeats or (1 if dry else 3))

    section("calibration_bf16_stats_cpu", calib)
    with tempfile.TemporaryDirectory() as tmp:
        saved: list[Path | None] = [None]

        def pruning():
            out, saved[0] = prune_times(
                lambda: build(kind, layers, torch.bfloat16, device), batches, device, Path(tmp)
            )
            return out

        section("prune_bf16", pruning)
        section(
            "semi_structured_2of4", lambda: semi_structured(saved[0], device, tokens=4096 if not dry else 64)
        )
    result.update(sections)
    result["seconds"] = time.perf_counter() - t0
    result["errors"] = [k for k, v in sections.items() if isinstance(v, dict) and "error" in v]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("mode", "device", "seconds", "errors")}))
    print(f"wrote {args.out}")
    raise SystemExit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
