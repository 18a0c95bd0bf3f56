"""Models bigger than the device (issue 25): peak RSS and time of `--offload disk` against the in-memory
run, and one process against two on the layer-wise pass.

    nice -n 10 python scripts/bench_offload.py --record docs/bench_offload.json --key cpu2
    nice -n 10 python scripts/bench_offload.py --parts rss --layers 4 8 --out out/bench_offload.json

Random Llamas (hidden 1024, MLP 4096, 16 heads, 4 KV heads, vocab 8000, fp32, untied head) of each
--layers are built and saved under --work, each in its own process, with a word-level tokenizer of
8000 IMDB words so that the embeddings do not dominate. Every prune is the real CLI (criterion
sparsegpt, 50%, `--dataset builtin:imdb`) in its own process, so each peak RSS is that process's own
(os.wait4; the report's offload.peak_host_bytes too where it has one).

- rss: none (in memory) then disk at each size; peak RSS against the weights' bytes. Targets: disk flat
  in the layers, <= 0.45x the weights at the largest size.
- time: none and disk alternating (A B A B ...) on the --time-layers model; ratio of the medians.
  Target <= 1.15x.
- procs: `accelerate launch` with 1 and 2 gloo CPU processes alternating on the same model and text,
  --threads per process (2 processes use 2x the cores, as 2 GPUs are 2x the devices); the report's
  timings_s per phase, the ratio of the medians of the layer-wise part (capture_inputs +
  layer_statistics + prune + share + layer_forward) and how far apart the two checkpoints are (bit
  equal, else the fraction of zero-pattern differences). Target <= 0.6x, identical masks.
- fsdp (not by default): the fisher global + lsq recipe in one process in memory against two processes
  with `--fsdp --offload disk`; peak RSS per process, time, and how far apart the checkpoints are.
- gpu (not by default; scripts/gpu_check.sh runs it): `--offload cpu` on a model bigger than the device
  memory the run may use, see part_gpu.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchjson import command_line, record

ROOT = Path(__file__).resolve().parents[1]
GPU_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
             "vocab_size": 8000}  # fmt: skip
DRY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 8000}  # fmt: skip
SHAPE = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_key_value_heads": 4,
         "vocab_size": 8000}  # fmt: skip
SHAPES = {"bench": SHAPE, "gpu": GPU_SHAPE, "dry": DRY_SHAPE}
LAUNCH = ["accelerate", "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
LAYER_WISE = ("capture_inputs", "layer_statistics", "prune", "share", "layer_forward")


def build_model(layers: int, folder: str, shape: dict = SHAPE) -> None:
    """Run in its own process (--build): the random model and its tokenizer, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llm_gradprune.calibration.data import iter_texts

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=shape["vocab_size"], special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(itertools.islice(iter_texts("builtin:imdb", split="all"), 5000), trainer)
    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=1, bos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        folder
    )


def model_folder(layers: int, work: Path, shape: str = "bench") -> Path:
    folder = work / f"llama_{shape}_{layers}l"
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, __file__, "--build", str(layers), str(folder), shape], check=True)
    return folder


def weight_bytes(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                total += _numel(sl.get_shape()) * {"F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 8)
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


SPARSEGPT = ["--criterion", "sparsegpt"]
# a gradient recipe: whole-model statistics and the global scope's counts, then the layer-wise pass
FISHER_GLOBAL_LSQ = "--criterion fisher --scope global --allow-empty-tensors --reconstruct lsq".split()


def prune_args(folder: Path, out: Path, args: argparse.Namespace, offload: str,
               method: list[str] = SPARSEGPT) -> list[str]:  # fmt: skip
    return ["--model", str(folder), "--dataset", "builtin:imdb", *method, "--sparsity", "0.5",
            "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--offload", offload,
            "--output-dir", str(out), "--overwrite", "--no-progress", "--no-eval"]  # fmt: skip


def run(cmd: list[str], out: Path, env: dict | None = None) -> dict:
    """One prune in its own process: wall time, its peak RSS (children included) and its report."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{err[-3000:]}")
    rep = json.loads((out / "pruning_report.json").read_text())
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "offload": rep.get("offload"),
            "timings_s": rep.get("timings_s", {})}  # fmt: skip


def prune_cli(folder: Path, out: Path, args: argparse.Namespace, offload: str) -> dict:
    cmd = ["llm-gradprune", "prune", *prune_args(folder, out, args, offload), "--threads", str(args.threads)]
    return run(cmd, out)


def part_rss(args: argparse.Namespace, work: Path) -> dict:
    rows = []
    for layers in args.layers:
        folder = model_folder(layers, work)
        row = {"layers": layers, "weights_bytes": weight_bytes(folder)}
        for mode in args.modes:
            r = prune_cli(folder, work / f"out_{mode}", args, mode)
            row[mode] = r
            row[f"{mode}_x_weights"] = r["peak_rss_bytes"] / row["weights_bytes"]
            shutil.rmtree(work / f"out_{mode}", ignore_errors=True)
            print(f"  {layers} layers {mode}: {r['peak_rss_bytes'] / 2**30:.2f} GiB in {r['wall_s']:.0f} s",
                  flush=True)  # fmt: skip
        rows.append(row)
        if args.drop_models:
            shutil.rmtree(folder, ignore_errors=True)
    if "disk" not in args.modes:
        return {"modes": args.modes, "rows": rows}
    last = rows[-1]
    disk = [r["disk"]["peak_rss_bytes"] for r in rows]
    return {"modes": args.modes, "rows": rows, "disk_growth_first_to_last": disk[-1] / disk[0],
            "targets_met": {"disk_le_0.45x_weights_at_largest": last["disk_x_weights"] <= 0.45,
                            "disk_flat_within_10pct": disk[-1] <= 1.1 * disk[0]}}  # fmt: skip


def part_time(args: argparse.Namespace, work: Path) -> dict:
    folder = model_folder(args.time_layers, work)
    runs: dict[str, list[dict]] = {"none": [], "disk": []}
    for rep in range(args.reps):
        for mode in ("none", "disk") if rep % 2 == 0 else ("disk", "none"):
            runs[mode].append(prune_cli(folder, work / f"time_{mode}", args, mode))
            print(f"  {args.time_layers} layers {mode}: {runs[mode][-1]['wall_s']:.1f} s", flush=True)
    med = {m: statistics.median(r["wall_s"] for r in rs) for m, rs in runs.items()}
    med_total = {m: statistics.median(r["timings_s"]["total"] for r in rs) for m, rs in runs.items()}
    same = compare(work / "time_none", work / "time_disk")
    return {"layers": args.time_layers, "runs": runs, "median_wall_s": med, "median_report_total_s": med_total,
            "wall_ratio_disk_over_none": med["disk"] / med["none"],
            "report_total_ratio_disk_over_none": med_total["disk"] / med_total["none"], "comparison": same,
            "targets_met": {"disk_le_1.15x": med["disk"] / med["none"] <= 1.15}}  # fmt: skip


def prune_launch(
    nproc: int, folder: Path, out: Path, args: argparse.Namespace, extra: list[str] = ()
) -> dict:
    """`extra`: what replaces the plain in-memory sparsegpt run's method and offload flags."""
    threads = args.threads  # per process: 1 vs 2 processes is 1 vs 2 devices, and the sums stay bit-equal
    flags = list(extra) or prune_args(folder, out, args, "none")
    cmd = [*LAUNCH, "--num_processes", str(nproc), *(["--multi_gpu"] if nproc > 1 else []),
           str(ROOT / "scripts" / "prune_llama.py"), *flags, "--threads", str(threads)]  # fmt: skip
    r = run(cmd, out, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    r["layer_wise_s"] = sum(r["timings_s"].get(k, 0.0) for k in LAYER_WISE)
    r["threads_per_process"] = threads
    return r


def part_procs(args: argparse.Namespace, work: Path) -> dict:
    folder = model_folder(args.time_layers, work)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(args.reps):
        for n in (1, 2) if rep % 2 == 0 else (2, 1):
            runs[n].append(prune_launch(n, folder, work / f"np{n}", args))
            r = runs[n][-1]
            print(
                f"  {n} process(es): layer-wise {r['layer_wise_s']:.1f} s, wall {r['wall_s']:.1f} s",
                flush=True,
            )
    med = {n: statistics.median(r["layer_wise_s"] for r in rs) for n, rs in runs.items()}
    med_total = {n: statistics.median(r["timings_s"]["total"] for r in rs) for n, rs in runs.items()}
    ratio = med[2] / med[1]
    return {"layers": args.time_layers, "runs": {str(n): rs for n, rs in runs.items()},
            "median_layer_wise_s": {str(n): v for n, v in med.items()},
            "median_report_total_s": {str(n): v for n, v in med_total.items()},
            "layer_wise_ratio_2_over_1": ratio, "comparison": compare(work / "np1", work / "np2"),
            "targets_met": {"layer_wise_le_0.6x": ratio <= 0.6}}  # fmt: skip


def part_fsdp(args: argparse.Namespace, work: Path) -> dict:
    """The fisher global + lsq recipe in one process in memory against two processes with `--fsdp
    --offload disk` (gradients on row shards, then the streamed pass): each one's peak RSS per process
    (the largest child's), its time, and how far apart the checkpoints are. One run each: the RSS and
    the comparison are what this part is for."""
    folder = model_folder(args.time_layers, work)
    one = prune_launch(1, folder, work / "fsdp_one", args,
                       prune_args(folder, work / "fsdp_one", args, "none", FISHER_GLOBAL_LSQ))  # fmt: skip
    print(
        f"  1 process in memory: {one['peak_rss_bytes'] / 2**30:.2f} GiB, {one['wall_s']:.0f} s", flush=True
    )
    two = prune_launch(2, folder, work / "fsdp_two", args,
                       [*prune_args(folder, work / "fsdp_two", args, "disk", FISHER_GLOBAL_LSQ), "--fsdp"])  # fmt: skip
    print(f"  2 processes, fsdp + disk: {two['peak_rss_bytes'] / 2**30:.2f} GiB per process, {two['wall_s']:.0f} s",
          flush=True)  # fmt: skip
    return {"layers": args.time_layers, "weights_bytes": weight_bytes(folder), "one_in_memory": one,
            "two_fsdp_disk": two, "rss_ratio_two_over_one": two["peak_rss_bytes"] / one["peak_rss_bytes"],
            "comparison": compare(work / "fsdp_one", work / "fsdp_two")}  # fmt: skip


def compare(a: Path, b: Path) -> dict:
    """The two checkpoints tensor by tensor: equal bit for bit, or how far apart (zero patterns, values)."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                out.update({k: path for k in fh.keys()})
        return out

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        return {"equal": False, "names_differ": sorted(set(wa) ^ set(wb))[:5]}
    differing, mask_diff, numel, max_abs = [], 0, 0, 0.0
    for k in sorted(wa):  # one tensor at a time: a 40-layer checkpoint never sits in memory twice
        with safe_open(str(wa[k]), framework="pt") as fa, safe_open(str(wb[k]), framework="pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        numel += x.numel()
        if not torch.equal(x, y):
            differing.append(k)
            mask_diff += int(((x == 0) != (y == 0)).sum())
            max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {"equal": not differing, "tensors": len(wa), "tensors_differing": len(differing),
            "first_differing": differing[:3], "zero_pattern_diff_fraction": mask_diff / numel,
            "max_abs_diff": max_abs}  # fmt: skip


def part_gpu(args: argparse.Namespace, work: Path) -> dict:
    """`--offload cpu` on a model bigger than the device memory the run may use: the smaller of the free
    memory (torch.cuda.mem_get_info) and --gpu-cap-gib, enforced in the prune process by
    set_per_process_memory_fraction (a model bigger than a whole H100 would not fit this machine's disk);
    the same run with `--offload none` must fail. Without CUDA: a tiny model on the CPU, the code path only."""
    import math

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        folder = model_folder(2, work, "dry")
        r = prune_capped(folder, work / "gpu_cpu", args, "cpu", None)
        return {"mode": "dry-run", "layers": 2, "offload_cpu": r, "peak_device_bytes": None}
    free, total = torch.cuda.mem_get_info()
    cap = min(free, int(args.gpu_cap_gib * 2**30)) if args.gpu_cap_gib > 0 else free
    per_layer = layer_bytes(GPU_SHAPE)
    layers = math.ceil(1.25 * cap / per_layer)  # weights alone 1.25x what the run may hold on the device
    folder = model_folder(layers, work, "gpu")
    weights = weight_bytes(folder)
    out = {"device": torch.cuda.get_device_name(), "free_bytes": free, "total_bytes": total, "cap_bytes": cap,
           "layers": layers, "weights_bytes": weights, "weights_over_cap": weights / cap}  # fmt: skip
    out["offload_cpu"] = r = prune_capped(folder, work / "gpu_cpu", args, "cpu", cap / total)
    out["peak_device_bytes"] = r.get("offload", {}).get("peak_device_bytes") if "error" not in r else None
    out["offload_none"] = prune_capped(folder, work / "gpu_none", args, "none", cap / total)
    if "error" in r:
        out["error"] = f"offload cpu failed: {r['error']}"
    elif "error" not in out["offload_none"]:
        out["error"] = (
            "offload none fitted under the cap: the model is not bigger than the memory the run may use"
        )
    shutil.rmtree(folder, ignore_errors=True)
    return out


def layer_bytes(shape: dict) -> int:
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return 4 * (2 * h * h + 2 * h * kv + 3 * h * m + 2 * h)


CAPPED = (
    "import sys, torch\n"
    "if sys.argv[1] != 'none': torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]))\n"
    "from llm_gradprune.commands import main\n"
    "sys.exit(main(['prune', *sys.argv[2:]]))"
)


def prune_capped(
    folder: Path, out: Path, args: argparse.Namespace, offload: str, fraction: float | None
) -> dict:
    """One prune in its own process with the device memory capped; a failure is one line, not an exception."""
    device = [] if fraction is not None else ["--device", "cpu"]
    cmd = [sys.executable, "-c", CAPPED, str(fraction) if fraction else "none",
           *prune_args(folder, out, args, offload), *device]  # fmt: skip
    try:
        r = run(cmd, out)
    except SystemExit as exc:
        lines = [x for x in str(exc).splitlines() if x.strip()]
        return {"error": lines[-1][:300] if lines else "failed"}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return r


def said(c: dict) -> str:
    if c["equal"]:
        return "checkpoints bit-equal"
    if "names_differ" in c:
        return f"checkpoints hold different tensors: {c['names_differ']}"
    return (f"checkpoints differ: {c['tensors_differing']} of {c['tensors']} tensors, zero patterns "
            f"{c['zero_pattern_diff_fraction']:.2%} apart, max |diff| {c['max_abs_diff']:.3g}")  # fmt: skip


def print_rss(rss: dict) -> None:
    """The rss rows, with the columns of the modes that ran (--modes)."""
    gib = 2**30
    modes = [m for m in ("none", "disk") if m in rss["rows"][0]]
    head = ["layers", "weights GiB"]
    for m in modes:
        head += [f"{m} peak RSS GiB", f"{m} / weights"]
    head += ["disk report peak GiB"] * ("disk" in modes) + [f"{m} s" for m in modes]
    print("\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in rss["rows"]:
        cells = [str(r["layers"]), f"{r['weights_bytes'] / gib:.2f}"]
        for m in modes:
            cells += [f"{r[m]['peak_rss_bytes'] / gib:.2f}", f"{r[f'{m}_x_weights']:.2f}"]
        if "disk" in modes:
            cells.append(f"{r['disk']['offload']['peak_host_bytes'] / gib:.2f}")
        cells += [f"{r[m]['wall_s']:.0f}" for m in modes]
        print("| " + " | ".join(cells) + " |")
    if "targets_met" in rss:
        print(f"targets: {rss['targets_met']}")


def print_tables(result: dict) -> None:
    if "rss" in result:
        print_rss(result["rss"])
    if "time" in result:
        t = result["time"]
        print(f"\n{t['layers']} layers, wall s none {[round(r['wall_s'], 1) for r in t['runs']['none']]} "
              f"disk {[round(r['wall_s'], 1) for r in t['runs']['disk']]}: median ratio disk/none "
              f"{t['wall_ratio_disk_over_none']:.3f} (report total {t['report_total_ratio_disk_over_none']:.3f}), "
              f"{said(t['comparison'])}, targets {t['targets_met']}")  # fmt: skip
    if "procs" in result:
        p = result["procs"]
        keys = ["calibration", *LAYER_WISE, "total"]
        print("\n| processes | run | " + " | ".join(keys) + " | layer-wise | wall |")
        print("|---" * (len(keys) + 4) + "|")
        for n, rs in p["runs"].items():
            for i, r in enumerate(rs):
                cells = " | ".join(f"{r['timings_s'].get(k, 0.0):.1f}" for k in keys)
                print(f"| {n} | {i + 1} | {cells} | {r['layer_wise_s']:.1f} | {r['wall_s']:.1f} |")
        print(f"layer-wise median ratio 2/1: {p['layer_wise_ratio_2_over_1']:.3f}, "
              f"{said(p['comparison'])}, targets {p['targets_met']}")  # fmt: skip
    if "fsdp" in result:
        f, gib = result["fsdp"], 2**30
        print(f"\n{f['layers']} layers ({f['weights_bytes'] / gib:.2f} GiB of weights), fisher global + lsq: "
              f"1 process in memory {f['one_in_memory']['peak_rss_bytes'] / gib:.2f} GiB, "
              f"{f['one_in_memory']['wall_s']:.0f} s; 2 processes --fsdp --offload disk "
              f"{f['two_fsdp_disk']['peak_rss_bytes'] / gib:.2f} GiB per process, {f['two_fsdp_disk']['wall_s']:.0f} s; "
              f"{said(f['comparison'])}")  # fmt: skip


PARTS = {"rss": part_rss, "time": part_time, "procs": part_procs, "fsdp": part_fsdp}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["rss", "time", "procs"],
        choices=[*PARTS, "gpu"],
        help="fsdp: not by default; gpu: run by scripts/gpu_check.sh, not by default",
    )
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 24, 40], help="sizes of the rss part")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["none", "disk"],
        choices=["none", "disk"],
        help="offload modes of the rss part (disk alone skips the slow in-memory rows)",
    )
    ap.add_argument("--time-layers", type=int, default=8, help="model of the time and procs parts")
    ap.add_argument(
        "--reps", type=int, default=4, help="alternating runs in the time and procs parts (A B A B)"
    )
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads of each process (1: the cores are shared)"
    )
    ap.add_argument(
        "--work", default="out/bench_offload", help="models and outputs (large: 2.5 GB at 40 layers)"
    )
    ap.add_argument("--drop-models", action="store_true", help="delete each rss model after its runs")
    ap.add_argument("--out", default="out/bench_offload.json")
    ap.add_argument(
        "--record", default=None, help="merge the result into this file (docs/bench_offload.json)"
    )
    ap.add_argument("--key", default=None, help="key in --record (default: cpu<threads>)")
    ap.add_argument("--gpu-cap-gib", type=float, default=4.0, help="gpu part: device memory the run may use")
    ap.add_argument("--build", nargs="+", help=argparse.SUPPRESS)  # LAYERS FOLDER [SHAPE]
    args = ap.parse_args()
    if args.build:
        return build_model(int(args.build[0]), args.build[1], SHAPES[(args.build + ["bench"])[2]])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"cores": os.cpu_count(), "threads": args.threads, "shape": SHAPE, "dtype": "float32",
                    "num_samples": args.num_samples, "seq_len": args.seq_len}  # fmt: skip
    for name in args.parts:
        print(f"{name}:", flush=True)
        result[name] = {**PARTS, "gpu": part_gpu}[name](args, work)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(result, indent=1) + "\n"
        )  # a late part failing keeps the early ones
    print_tables(result)
    if args.record:
        key = args.key or f"cpu{args.threads}"
        record(args.record, key, [f"nice -n 10 {command_line()}"], result)
        print(f"recorded it in {args.record} under {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
