"""Time the least-squares refit (`reconstruct: lsq`) against the OBS pass on the same masks.

    nice -n 10 python -m scripts.bench_lsq [--repeats 3 --threads 1 --real-blocks 16 --samples 4096]

It writes out/bench_lsq.json (--out) and records it in docs/bench_lsq.json under `threads_<--threads>` (--key).

Run from the repository root with `-m`: the two references come from tests/reference_lsq.py.

Three variants on every (layer, mask), in alternating order per repeat (so drift in the machine's load
hits all of them): `obs` (reconstruction.obs.obs_update_, blocksize 128, the greedy left-to-right
pass), `lsq_old` (the per-row Cholesky refit the library had before, kept verbatim in
tests/reference_lsq.py) and `lsq` (reconstruction.lsq.lsq_update_, conjugate gradients through the
shared inverse).
Reported: the fastest of the repeats per variant, the ratios lsq/obs and lsq/lsq_old, how far the new
refit is from the old one and from an fp64 per-row solve (relative Frobenius norm of the weights), and
both refits' layer losses. Each time is also given in units of one [out, in] x [in, in] fp32 matmul
(timed in the same alternation): the refit's conjugate-gradient iteration is one such matmul, so
`lsq_in_matmuls` is about its iteration count, and `obs_in_matmuls` what an OBS pass costs in them.
`--skip-old` leaves out lsq_old (the slow reference; its columns are then empty).

Layers: the SmolLM2-135M shapes q/o (576x576), k/v (192x576), gate/up (1536x576), down (576x1536) with
random correlated inputs (X = Z A diag(c), Z and A Gaussian, c log-normal channel scales, --samples
tokens), and, unless --real-blocks 0, the real weights and Hessians of SmolLM2-135M layers 0, 12 and 27
(from --real-blocks x 512 calibration tokens of builtin:imdb). Masks: `row50` (50% of each row by
|w| sqrt(H_jj)), `global` (one threshold over the tensor on that score times a log-normal per-row
factor: uneven per-row counts, some rows keep everything or nothing) and `2:4`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_gradprune.reconstruction.lsq import lsq_update_
from llm_gradprune.reconstruction.obs import obs_update_

try:
    from benchjson import save
except ImportError:  # run as `python -m scripts.bench_lsq`, which puts the root, not scripts/, on the path
    from scripts.benchjson import save

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
REAL_LAYERS = (0, 12, 27)
REAL_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def random_layer(rows: int, cols: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.exp(torch.randn(cols, generator=g))  # a few channels much louder, as in LLM inputs
    X = (torch.randn(samples, cols, generator=g) @ A) * scale
    return torch.randn(rows, cols, generator=g) / cols**0.5, 2 * X.T @ X / samples


def real_layers(blocks: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gradprune.calibration.assets import resolve_model
    from llm_gradprune.calibration.data import TextSource, load_samples
    from llm_gradprune.calibration.hessians import Hessians

    path = resolve_model("builtin:smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = load_samples(TextSource("builtin:imdb"), AutoTokenizer.from_pretrained(path), blocks, 512)
    names = [f"model.layers.{i}.{m}" for i in REAL_LAYERS for m in REAL_MODULES]
    modules = {n: model.get_submodule(n) for n in names}
    hs = Hessians(modules).attach()
    with torch.no_grad():
        for b in data.split(1):
            model(b)
    hs.detach()
    return {
        n.removeprefix("model."): (modules[n].weight.detach().clone(), hs.hessian(n).clone()) for n in names
    }


def masks_for(W: torch.Tensor, H: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    score = W.abs() * H.diagonal().clamp_min(0).sqrt()
    row50 = score < score.median(dim=1, keepdim=True).values
    g = torch.Generator().manual_seed(seed)
    uneven = score * torch.exp(1.5 * torch.randn(W.shape[0], 1, generator=g))
    glob = uneven <= uneven.flatten().kthvalue(W.numel() // 2).values
    drop = score.reshape(-1, 4).argsort(dim=1)[:, :2]
    nm = torch.zeros(W.numel() // 4, 4, dtype=torch.bool).scatter_(1, drop, True).view_as(W)
    return {"row50": row50, "global": glob, "2:4": nm}


VARIANTS = ("obs", "lsq_old", "lsq")


def references():
    """The previous refit and the fp64 solve live with the tests that check the refit against them."""
    try:
        from tests.reference_lsq import direct64, old_lsq_update_
    except ModuleNotFoundError:
        raise SystemExit(
            "bench_lsq: tests/reference_lsq.py is not importable: run it from the repository root as "
            "`python -m scripts.bench_lsq`"
        ) from None
    return old_lsq_update_, direct64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _matmul(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor) -> dict:
    torch.mm(W, H)  # the unit: one CG iteration's matmul, same shapes and threads
    return {"obs_loss": float("nan")}


def bench(
    name: str, W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, repeats: int, variants: list[str]
) -> dict:
    old_lsq_update_, direct64 = references()
    every = {"obs": lambda W, H, M: obs_update_(W, H, M, blocksize=128), "lsq_old": old_lsq_update_,
             "lsq": lsq_update_}  # fmt: skip
    run = {**{v: every[v] for v in variants}, "matmul": _matmul}
    times: dict[str, list[float]] = {v: [] for v in run}
    cpu: dict[str, list[float]] = {v: [] for v in run}
    out: dict[str, tuple[torch.Tensor, dict]] = {}
    order = list(run)
    for rep in range(repeats):
        for v in order if rep % 2 == 0 else order[::-1]:
            w = W.clone()
            t, c = time.perf_counter(), time.process_time()
            info = run[v](w, H, mask)
            times[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
            out[v] = (w, info)
    best = {v: min(ts) for v, ts in times.items()}
    best_cpu = {v: min(ts) for v, ts in cpu.items()}
    truth = direct64(W, H, mask)
    new = out["lsq"][0]
    old = out["lsq_old"][0] if "lsq_old" in out else None
    counts = (~mask).sum(dim=1)
    return {
        "layer": name, "shape": list(W.shape), "kept_per_row": [int(counts.min()), int(counts.max())],
        "seconds": best, "median_seconds": {v: statistics.median(ts) for v, ts in times.items()},
        "cpu_seconds": best_cpu, "lsq_over_obs": best["lsq"] / best["obs"],
        "lsq_over_obs_cpu": best_cpu["lsq"] / best_cpu["obs"],
        "lsq_over_lsq_old": best["lsq"] / best["lsq_old"] if old is not None else None,
        "obs_in_matmuls": best["obs"] / best["matmul"], "lsq_in_matmuls": best["lsq"] / best["matmul"],
        "rel_lsq_vs_lsq_old": rel(new, old) if old is not None else None, "rel_lsq_vs_fp64": rel(new, truth),
        "rel_lsq_old_vs_fp64": rel(old, truth) if old is not None else None,
        "pruned_exactly_zero": bool((new[mask] == 0).all()),
        "loss": {v: out[v][1]["obs_loss"] for v in variants},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench_lsq.json", help="the raw result")
    ap.add_argument("--record", default="docs/bench_lsq.json", help="merged record file ('' : none)")
    ap.add_argument("--key", default=None, help="the record's key (default threads_<--threads>)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (obs always runs its loop on one)")
    ap.add_argument("--samples", type=int, default=4096, help="tokens of the random inputs")
    ap.add_argument(
        "--real-blocks", type=int, default=16, help="512-token blocks for the real Hessians; 0: none"
    )
    ap.add_argument("--skip-old", action="store_true", help="leave out lsq_old (the slow reference)")
    args = ap.parse_args()
    references()  # fail at once, not after the real layers' calibration
    torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if not (args.skip_old and v == "lsq_old")]
    layers = {
        f"random {n}": random_layer(*shape, args.samples, seed=i)
        for i, (n, shape) in enumerate(SHAPES.items())
    }
    if args.real_blocks:
        layers.update({f"smollm2 {n}": wh for n, wh in real_layers(args.real_blocks).items()})
    rows = []
    print(f"{'layer':26s} {'mask':6s} {'obs s':>6s} {'old s':>6s} {'lsq s':>6s} {'lsq/obs':>7s} {'(cpu)':>6s} "
          f"{'old/lsq':>7s} {'vs old':>8s} {'vs fp64':>8s} {'old fp64':>8s} {'obs mm':>6s} {'lsq mm':>6s}")  # fmt: skip
    for li, (name, (W, H)) in enumerate(layers.items()):
        for kind, mask in masks_for(W, H, seed=li).items():
            row = bench(name, W, H, mask, args.repeats, variants)
            row["mask"] = kind
            rows.append(row)
            s = row["seconds"]
            f = lambda x, spec: format(x, spec) if x is not None else format("-", spec[:-2].rstrip(".") + "s")  # noqa: E731
            print(f"{name:26s} {kind:6s} {s['obs']:6.3f} {f(s.get('lsq_old'), '6.3f')} {s['lsq']:6.3f} "
                  f"{row['lsq_over_obs']:7.2f} {row['lsq_over_obs_cpu']:6.2f} "
                  f"{f(1 / row['lsq_over_lsq_old'] if row['lsq_over_lsq_old'] else None, '7.1f')} "
                  f"{f(row['rel_lsq_vs_lsq_old'], '8.1e')} {row['rel_lsq_vs_fp64']:8.1e} {f(row['rel_lsq_old_vs_fp64'], '8.1e')} "
                  f"{row['obs_in_matmuls']:6.1f} {row['lsq_in_matmuls']:6.1f}", flush=True)  # fmt: skip
    total = {v: sum(r["seconds"][v] for r in rows) for v in [*variants, "matmul"]}
    total_cpu = {v: sum(r["cpu_seconds"][v] for r in rows) for v in [*variants, "matmul"]}
    old = "lsq_old" in variants
    summary = {
        "total_seconds": total, "lsq_over_obs_total": total["lsq"] / total["obs"],
        "total_cpu_seconds": total_cpu, "lsq_over_obs_total_cpu": total_cpu["lsq"] / total_cpu["obs"],
        "lsq_old_over_lsq_total": total["lsq_old"] / total["lsq"] if old else None,
        "lsq_over_obs_max": max(r["lsq_over_obs"] for r in rows),
        "obs_in_matmuls_total": total["obs"] / total["matmul"], "lsq_in_matmuls_total": total["lsq"] / total["matmul"],
        "rel_lsq_vs_lsq_old_max": max(r["rel_lsq_vs_lsq_old"] for r in rows) if old else None,
        "rel_lsq_vs_fp64_max": max(r["rel_lsq_vs_fp64"] for r in rows),
        "pruned_exactly_zero": all(r["pruned_exactly_zero"] for r in rows),
    }  # fmt: skip
    print(f"total: obs {total['obs']:.2f} s, lsq {total['lsq']:.2f} s: lsq/obs x{summary['lsq_over_obs_total']:.2f} "
          f"(CPU time x{summary['lsq_over_obs_total_cpu']:.2f}); in one-matmul units obs "
          f"{summary['obs_in_matmuls_total']:.1f}, lsq {summary['lsq_in_matmuls_total']:.1f}"
          + (f"; {summary['lsq_old_over_lsq_total']:.1f}x faster than lsq_old, largest distance to it "
             f"{summary['rel_lsq_vs_lsq_old_max']:.1e}" if old else ""))  # fmt: skip
    result = {"args": vars(args), "threads": torch.get_num_threads(), "summary": summary, "rows": rows}
    save(args, result)


if __name__ == "__main__":
    main()
