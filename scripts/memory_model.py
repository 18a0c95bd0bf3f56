"""Memory model of gradient calibration: bytes per parameter and per token, and what they predict.

    python scripts/memory_model.py [--measured docs/bench_calibration.json [--key fisher_5x256]]

Terms (P = all parameters, T = target parameters, b = bytes of the model dtype, s = statistics the
criterion reads: fisher/taylor/gradient 1, gblm/blend 1 + per-channel activation sums, magnitude 0):

    model           b * P
    statistics      4 * s * T                       (fp32; on the host with stats_device=cpu)
    gradients       naive loop: b * T (every .grad kept); ours: b * largest target tensor (one in flight)
                    (+ 4 * T for grad_accum > 1; + 2 pinned host buffers of the largest tensor for cpu stats)
    activations     b * tokens * layers * (8h + 2kv + 4i + 2 * heads * seq_if_math_attention)
                    + 12 * tokens * vocab (fp32 logits, log-softmax and its gradient)
                    with gradient checkpointing: b * tokens * layers * h + one layer's full activations

The activation count follows the tensors autograd saves in a Llama layer: the layer input and the
two norm outputs, q, the two kv projections and their GQA-repeated copies, the attention output, the
second norm's input, gate/SiLU/up/product of the MLP, and with the plain ("math") attention used on a
CPU the attention scores and probabilities (flash attention on a GPU keeps none).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from benchjson import result_of

GB = 1e9


@dataclass
class Shape:
    name: str
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_targets(self) -> int:
        h, kv, i = self.hidden, self.kv, self.inter
        return 2 * h * h + 2 * h * kv + 3 * h * i

    @property
    def targets(self) -> int:
        return self.layers * self.layer_targets

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.targets + emb + (2 * self.layers + 1) * self.hidden

    @property
    def largest(self) -> int:
        return self.hidden * self.inter


SHAPES = {
    "smollm2-135m": Shape("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, True),
    "tinyllama-4l": Shape("TinyLlama-1.1B shape, 4 layers", 4, 2048, 5632, 32, 4, 32000, False),
    "tinyllama-1.1b": Shape("TinyLlama-1.1B shape", 22, 2048, 5632, 32, 4, 32000, False),
    "llama2-7b": Shape("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000, False),
    "llama2-70b": Shape("Llama-2-70B", 80, 8192, 28672, 64, 8, 32000, False),
}


def predict(
    s: Shape, *, b: int, tokens: int, seq: int, variant: str = "ours", stats: int = 1,
    math_attention: bool = False, checkpointing: bool = False, stats_on_host: bool = False,
    shards: int = 1,
) -> dict[str, float]:  # fmt: skip
    """Bytes on one device (and on the host) for calibration; `shards` = FSDP ranks sharing P and T."""
    per_tok_layer = 8 * s.hidden + 2 * s.kv + 4 * s.inter + (2 * s.heads * seq if math_attention else 0)
    if checkpointing:
        acts = b * tokens * (s.layers * s.hidden + per_tok_layer)
    else:
        acts = b * tokens * s.layers * per_tok_layer
    acts += 12 * tokens * s.vocab
    out = {"model": b * s.params / shards, "activations": acts}
    if variant == "naive":
        out["gradients"] = b * s.targets / shards
        out["statistics"] = 0.0
    else:
        out["gradients"] = b * s.largest
        out["statistics"] = 0.0 if stats_on_host else 4 * stats * s.targets / shards
    if shards > 1:  # FSDP gathers one layer (and prefetches the next) in full
        out["gathered_layers"] = 2 * b * s.layer_targets
    out["device_total"] = sum(out.values())
    out["host_statistics"] = 4 * stats * s.targets / shards if stats_on_host else 0.0
    return out


def predict_recovery(
    s: Shape, *, b: int, tokens: int, seq: int, lora_r: int = 0, checkpointing: bool = False,
    teacher_on_device: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Bytes on one device for masked recovery training (recovery/trainer.py).

    Full: the target weights train, so their gradients (b T) and AdamW's two moments join the model;
    below fp32 (b < 4) the optimizer steps fp32 master copies (4 T) with fp32 moments (8 T) and fp32
    gradients (4 T; each b-byte gradient is freed as it is copied), else the moments are 2 b T; LoRA rank r: only the adapters train (r (in + out) per target:
    r (9h + 2kv + 3i) per layer), the frozen base weights form no gradient. Both keep the pruned masks
    (one bool byte per target weight) and the same activations as calibration; distillation adds the
    teacher (b P) unless it sits on the host (`teacher_device: cpu`)."""
    acts = predict(s, b=b, tokens=tokens, seq=seq, checkpointing=checkpointing)["activations"]
    out = {"model": b * s.params, "masks": 1.0 * s.targets, "activations": acts}
    if lora_r:
        adapters = lora_r * s.layers * (9 * s.hidden + 2 * s.kv + 3 * s.inter)
        out["adapters+grads+adamw"] = 4 * b * adapters
    else:
        out["gradients"] = max(b, 4) * s.targets
        if b < 4:
            out["fp32 masters"] = 4.0 * s.targets
            out["adamw"] = 8.0 * s.targets
        else:
            out["adamw"] = 2 * b * s.targets
    if teacher_on_device:
        out["teacher"] = b * s.params
    out["device_total"] = sum(out.values())
    return out


def fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / GB:.2f}" for k, v in d.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", default=None, help="docs/bench_calibration.json to compare with")
    ap.add_argument("--key", default="fisher_5x256", help="the --measured record's key (a 5-block run)")
    args = ap.parse_args()
    for key, s in SHAPES.items():
        print(f"{s.name}: P = {s.params / 1e9:.3f} B, T = {s.targets / 1e9:.3f} B, largest target "
              f"{s.largest / 1e6:.1f} M ({key})")  # fmt: skip
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
        p = predict(SHAPES[key], **kw)
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
        p = predict_recovery(SHAPES["llama2-7b"], tokens=2048, seq=2048, **kw)
        fits = [g for g in (24, 40, 80) if p["device_total"] < g * GB * 0.95]
        print(
            f"- {label}: {fmt(p)} -> fits in {fits[0]} GB" if fits else f"- {label}: {fmt(p)} -> over 80 GB"
        )
    if args.measured:
        rows = result_of(args.measured, args.key)["rows"]
        print("\nMeasured on this CPU (calibration-phase peak RSS, MB) vs predicted (MB):")
        for r in rows:
            key = "smollm2-135m" if r["model"] == "smollm2" else "tinyllama-4l"
            b = 4 if r["dtype"] == "float32" else 2
            seq = r["naive"]["tokens"] // 5 if r["naive"]["tokens"] % 5 == 0 else r["naive"]["tokens"]
            for variant in ("naive", "ours"):
                m = r[variant]
                p = predict(SHAPES[key], b=b, tokens=seq, seq=seq, variant=variant, math_attention=True)
                print(f"- {r['model']} {r['dtype']} {variant}: measured {m['calib_peak_rss_mb']:.0f} "
                      f"(after build {m['rss_after_build_mb']:.0f}, so +{m['calib_peak_rss_mb'] - m['rss_after_build_mb']:.0f}); "
                      f"predicted model+grads/stats+activations {p['device_total'] / 1e6:.0f} "
                      f"(+{(p['device_total'] - p['model']) / 1e6:.0f} over the model)")  # fmt: skip


if __name__ == "__main__":
    main()
