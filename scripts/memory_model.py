"""The memory model (llm_gradprune/memory.py, docs/MEMORY.md) as tables: gradient calibration, recovery
training, and the peak host and device memory of a layer-wise run per offload mode.

    python scripts/memory_model.py [--out memory.json] [--record docs/bench_memory.json]
    python scripts/memory_model.py --measured docs/bench_calibration.json [--key fisher_5x256]

Calibration terms (P = all parameters, T = target parameters, b = bytes of the model dtype, s =
statistics the criterion reads: fisher/taylor/gradient 1, gblm/blend 1 + per-channel activation sums):

    model           b * P
    statistics      4 * s * T                       (fp32; on the host with stats_device=cpu)
    gradients       naive loop: b * T (every .grad kept); ours: b * largest target tensor (one in flight)
    activations     b * tokens * layers * (8h + 2kv + 4i + 2 * heads * seq_if_math_attention) for a Llama
                    + 12 * tokens * vocab (fp32 logits, log-softmax and its gradient)
                    with gradient checkpointing: b * tokens * layers * h + one layer's full activations

The offload table: bf16 weights, sparsegpt layer-wise (no whole-model statistics), 128 x 2048
calibration tokens, one process; the phases and terms of each peak are in docs/MEMORY.md.
"""

from __future__ import annotations

import argparse

from benchjson import result_of, save

from llm_gradprune.memory import BIG, GB, OFFLOADS, SHAPES, RunSettings, calibration_terms, recovery_terms
from llm_gradprune.memory import predict as predict_peaks


def fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / GB:.2f}" for k, v in d.items())


OFFLOAD_RUN = RunSettings(dtype_bytes=2, samples=128, seq_len=2048)  # sparsegpt layer-wise, bf16, 1 GPU


def offload_table() -> dict:
    """Peak host and device GB per offload mode of the five large shapes; printed as docs/MEMORY.md's table."""
    print(
        "\nLayer-wise sparsegpt, bf16, 128 x 2048 tokens, 1 process: peak GB per offload mode (host / device)"
    )
    print("| model | parameters | " + " | ".join(f"{m}: host | {m}: device" for m in OFFLOADS) + " |")
    print("|---|---|" + "---|---|" * len(OFFLOADS))
    rows = {}
    for key in BIG:
        s = SHAPES[key]
        peaks = {m: predict_peaks(s, OFFLOAD_RUN, m) for m in OFFLOADS}
        rows[key] = {"name": s.name, "params": s.params, "targets": s.targets,
                     **{m: {"host_gb": p.host / GB, "device_gb": p.device / GB, "host_terms": p.host_terms,
                            "device_terms": p.device_terms} for m, p in peaks.items()}}  # fmt: skip
        cells = " | ".join(f"{p.host / GB:.1f} | {p.device / GB:.1f}" for p in peaks.values())
        print(f"| {s.name} | {s.params / 1e9:.1f} B | {cells} |")
    return {"settings": vars(OFFLOAD_RUN), "offload": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", default=None, help="docs/bench_calibration.json to compare with")
    ap.add_argument("--key", default="fisher_5x256", help="the --measured record's key (a 5-block run)")
    ap.add_argument("--out", default=None, help="write the offload table's numbers to this JSON file")
    ap.add_argument("--record", default=None, help="with --out: merge them into this record (key offload)")
    args = ap.parse_args()
    for key, s in SHAPES.items():
        print(f"{s.name}: P = {s.params / 1e9:.3f} B, T = {s.targets / 1e9:.3f} B, largest target "
              f"{s.largest_matrix / 1e6:.1f} M ({key})")  # fmt: skip
    print("\nPredictions in GB (b = bytes per weight; one gradient statistic, e.g. fisher):")
    cases = [
        ("Llama-2-7B bf16, 1x2048, 1 GPU, naive", "llama2-7b", dict(b=2, tokens=2048, seq=2048, variant="naive")),
        ("Llama-2-7B bf16, 1x2048, 1 GPU, ours", "llama2-7b", dict(b=2, tokens=2048, seq=2048)),
        ("Llama-2-7B bf16, 1x2048, 1 GPU, ours + stats cpu", "llama2-7b", dict(b=2, tokens=2048, seq=2048, stats_on_host=True)),
        ("Llama-2-7B bf16, 1x4096, 1 GPU, ours + ckpt", "llama2-7b", dict(b=2, tokens=4096, seq=4096, checkpointing=True)),
        ("Llama-2-7B fp32, 1x2048, 1 GPU, naive", "llama2-7b", dict(b=4, tokens=2048, seq=2048, variant="naive")),
        ("Llama-2-7B fp32, 1x2048, 1 GPU, ours + stats cpu", "llama2-7b", dict(b=4, tokens=2048, seq=2048, stats_on_host=True)),
        ("Llama-2-70B bf16, 1x2048, 1 GPU, ours + stats cpu + ckpt", "llama2-70b", dict(b=2, tokens=2048, seq=2048, stats_on_host=True, checkpointing=True)),
        ("Llama-2-70B bf16, 1x2048/rank, 8 GPUs FSDP, ours + ckpt", "llama2-70b", dict(b=2, tokens=2048, seq=2048, checkpointing=True, shards=8)),
        ("Llama-2-70B bf16, 1x2048/rank, 8 GPUs FSDP, ours + stats cpu + ckpt", "llama2-70b", dict(b=2, tokens=2048, seq=2048, checkpointing=True, shards=8, stats_on_host=True)),
        ("Llama-2-70B bf16, 1x2048/rank, 8 GPUs FSDP, naive + ckpt", "llama2-70b", dict(b=2, tokens=2048, seq=2048, checkpointing=True, shards=8, variant="naive")),
    ]  # fmt: skip
    for label, key, kw in cases:
        p = calibration_terms(SHAPES[key], **kw)
        fits = "fits" if p["device_total"] < 80 * GB * 0.95 else "DOES NOT FIT"
        print(f"- {label}: {fmt(p)} -> {fits} in 80 GB")
    print("\nRecovery training, GB on one device (Llama-2-7B, 1x2048 tokens per micro-batch):")
    rec_cases = [
        ("full, bf16", dict(b=2)), ("full, bf16, checkpointing", dict(b=2, checkpointing=True)),
        ("full, bf16, checkpointing, distillation (teacher on the GPU)", dict(b=2, checkpointing=True, teacher_on_device=True)),
        ("full, fp32, checkpointing", dict(b=4, checkpointing=True)),
        ("LoRA r 16, bf16", dict(b=2, lora_r=16)), ("LoRA r 16, bf16, checkpointing", dict(b=2, lora_r=16, checkpointing=True)),
        ("LoRA r 16, fp32, checkpointing", dict(b=4, lora_r=16, checkpointing=True)),
    ]  # fmt: skip
    for label, kw in rec_cases:
        p = recovery_terms(SHAPES["llama2-7b"], tokens=2048, seq=2048, **kw)
        fits = [g for g in (24, 40, 80) if p["device_total"] < g * GB * 0.95]
        print(
            f"- {label}: {fmt(p)} -> fits in {fits[0]} GB" if fits else f"- {label}: {fmt(p)} -> over 80 GB"
        )
    table = offload_table()
    if args.out:
        save(argparse.Namespace(out=args.out, record=args.record, key="offload", threads=None), table)
    if args.measured:
        rows = result_of(args.measured, args.key)["rows"]
        print("\nMeasured on this CPU (calibration-phase peak RSS, MB) vs predicted (MB):")
        for r in rows:
            key = "smollm2-135m" if r["model"] == "smollm2" else "tinyllama-4l"
            b = 4 if r["dtype"] == "float32" else 2
            seq = r["naive"]["tokens"] // 5 if r["naive"]["tokens"] % 5 == 0 else r["naive"]["tokens"]
            for variant in ("naive", "ours"):
                m = r[variant]
                p = calibration_terms(
                    SHAPES[key], b=b, tokens=seq, seq=seq, variant=variant, math_attention=True
                )
                print(f"- {r['model']} {r['dtype']} {variant}: measured {m['calib_peak_rss_mb']:.0f} "
                      f"(after build {m['rss_after_build_mb']:.0f}, so +{m['calib_peak_rss_mb'] - m['rss_after_build_mb']:.0f}); "
                      f"predicted model+grads/stats+activations {p['device_total'] / 1e6:.0f} "
                      f"(+{(p['device_total'] - p['model']) / 1e6:.0f} over the model)")  # fmt: skip


if __name__ == "__main__":
    main()
