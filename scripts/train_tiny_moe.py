"""Train a tiny Mixtral from a random init on IMDB reviews: the MoE the expert-removal benchmark prunes.

    nice -n 10 python scripts/train_tiny_moe.py            # ~15-20 min on 2 cores, writes out/tiny_moe/
    python scripts/train_tiny_moe.py --steps 3 --smoke     # seconds: a 2-layer model, a few steps

No real MoE checkpoint can be had offline, so the benchmark's MoE is trained here, briefly, and says so.
Text: builtin:imdb split train (seed 1 order, so the benchmark's calibration blocks, seed 0, are other
windows of the same split; no held-out review is ever trained on), tokenized by the builtin SmolLM2
tokenizer (vocab 49152; the embeddings are tied so they are counted once). Training: AdamW, linear
warm-up then cosine to 10% of the peak, gradient clipping 1.0, Mixtral's load-balancing loss (as real
MoEs are trained; it is switched off in the saved config so a loss is plain cross-entropy again).
Everything is seeded and the thread count is fixed, so a rerun on the same machine gives the same model.

Writes out/tiny_moe/ (`save_pretrained` + the tokenizer; out/ is not committed) and
out/tiny_moe/training.json: the settings, the loss curve, the held-out loss and the routing load per
expert on held-out IMDB and on the licence texts of /usr/share/common-licenses (are experts
specialised, or is routing uniform?).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers

from llm_gradprune.calibration.assets import resolve_model
from llm_gradprune.calibration.data import TextSource, load_samples, micro_batches, token_hash

ROOT = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "tiny_moe", help="the model folder")
    ap.add_argument("--hidden", type=int, default=192, help="hidden size")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    ap.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token")
    ap.add_argument("--inter", type=int, default=384, help="intermediate size of one expert")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per block")
    ap.add_argument("--batch", type=int, default=8, help="blocks per step")
    ap.add_argument("--steps", type=int, default=700, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up, fraction of the steps")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument(
        "--aux-coef",
        type=float,
        default=0.02,
        help="load-balancing loss weight (0: none; Mixtral-8x7B: 0.02)",
    )
    ap.add_argument(
        "--eval-samples", type=int, default=32, help="held-out blocks for the final loss and routing"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (fixed: results depend on it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument(
        "--smoke", action="store_true", help="2 layers, 4 experts, hidden 64: a seconds-long check"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.experts, args.batch, args.seq_len, args.eval_samples = 2, 4, 2, 64, 4
        args.hidden, args.inter = 64, 128
    if not 1 <= args.top_k <= args.experts:
        raise SystemExit(f"train_tiny_moe: --top-k {args.top_k} must be in [1, --experts {args.experts}]")
    return args


def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m"))


def build(args, tok) -> transformers.MixtralForCausalLM:
    config = transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=args.inter,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.seq_len,
        tie_word_embeddings=True, router_aux_loss_coef=args.aux_coef, output_router_logits=args.aux_coef > 0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return transformers.MixtralForCausalLM(config)


def lr_at(step: int, args) -> float:
    """Linear warm-up to the peak, then cosine down to 10% of it."""
    warm = max(1, round(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, batches: list[torch.Tensor], args) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))  # fmt: skip
    model.train()
    curve, window, aux, t0 = [], [], [], time.perf_counter()
    for step, batch in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # out.loss holds the weighted balancing loss too: the curve reports cross-entropy alone
        a = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
        window.append(float(out.loss.detach()) - args.aux_coef * a)
        aux.append(a)
        if (step + 1) % args.log_every == 0 or step + 1 == len(batches):
            row = {"step": step + 1, "loss": sum(window) / len(window), "aux_loss": sum(aux) / len(aux),
                   "lr": lr_at(step, args), "seconds": time.perf_counter() - t0}  # fmt: skip
            curve.append(row)
            print(f"step {row['step']:4d}  loss {row['loss']:.4f}  aux {row['aux_loss']:.3f}  "
                  f"lr {row['lr']:.2e}  {row['seconds']:.0f} s", flush=True)  # fmt: skip
            window, aux = [], []
    model.eval()
    return curve


def licence_text() -> Path:
    """The licence texts as one paragraph per line, shared with the benchmark (legal prose, not IMDB)."""
    from bench_recovery import ood_text

    return ood_text(LICENSES)


@torch.no_grad()
def routing(model, blocks: torch.Tensor) -> dict:
    """Per layer: the share of top-k slots each expert takes, and how uniform that is."""
    k, layers = model.config.num_experts_per_tok, []
    counts = None
    for block in blocks.split(4):
        logits = model(input_ids=block, output_router_logits=True).router_logits
        chosen = [lg.float().topk(k, dim=-1).indices.flatten() for lg in logits]
        n = model.config.num_local_experts
        c = torch.stack([torch.bincount(x, minlength=n) for x in chosen]).double()
        counts = c if counts is None else counts + c
    for c in counts:
        share = c / c.sum()
        entropy = float(-(share * share.clamp_min(1e-12).log()).sum() / math.log(len(share)))
        layers.append({"share": [round(float(s), 4) for s in share], "min_share": float(share.min()),
                       "max_share": float(share.max()), "entropy_over_max": entropy})  # fmt: skip
    return {"tokens": int(blocks.numel()), "layers": layers}


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor) -> float:
    losses = [float(model(input_ids=b, labels=b).loss) for b in blocks.split(4)]
    return sum(losses) / len(losses)


def domain_shift(imdb: dict, ood: dict) -> list[float]:
    """Per layer, the total variation distance between the expert shares on IMDB and on licences
    (0: the same experts serve both; 1: disjoint experts)."""
    return [0.5 * sum(abs(a - b) for a, b in zip(x["share"], y["share"], strict=True))
            for x, y in zip(imdb["layers"], ood["layers"], strict=True)]  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = tokenizer()
    model = build(args, tok)
    blocks = load_samples(
        TextSource("builtin:imdb", "train", seed=1), tok, args.steps * args.batch, args.seq_len
    )
    held = load_samples(TextSource("builtin:imdb", "test", seed=0), tok, args.eval_samples, args.seq_len)
    ood = load_samples(TextSource(str(licence_text()), "all", seed=0), tok, args.eval_samples, args.seq_len)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny Mixtral: {params:,} parameters, {args.steps} steps x {args.batch} x {args.seq_len} tokens",
        flush=True,
    )
    t0 = time.perf_counter()
    curve = train(model, micro_batches(blocks, args.batch), args)
    seconds = time.perf_counter() - t0
    model.config.output_router_logits = False  # a loaded model's loss is cross-entropy alone
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "params": params, "train_tokens": int(blocks.numel()), "train_tokens_sha256": token_hash(blocks),
        "train_seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "curve": curve,
        "held_out_loss": held_out_loss(model, held), "ood_loss": held_out_loss(model, ood),
        "routing_imdb": routing(model, held), "routing_ood": routing(model, ood),
    }  # fmt: skip
    result["routing_shift_tv"] = domain_shift(result["routing_imdb"], result["routing_ood"])
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"trained in {seconds:.0f} s; held-out loss {result['held_out_loss']:.4f} "
          f"(ppl {math.exp(result['held_out_loss']):.1f}), licences {result['ood_loss']:.4f}; wrote {args.out}")  # fmt: skip
    for i, (a, b) in enumerate(
        zip(result["routing_imdb"]["layers"], result["routing_ood"]["layers"], strict=True)
    ):
        print(f"layer {i}: IMDB shares {a['share']} (entropy/max {a['entropy_over_max']:.3f}), "
              f"licences entropy/max {b['entropy_over_max']:.3f}, shift {result['routing_shift_tv'][i]:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
