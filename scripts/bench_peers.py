"""Our pruning side by side with llm-compressor's, on the same machine, blocks and evaluation.

    python scripts/bench_peers.py --setup      # once: out/peers-venv, torch==2.13.0 (CPU wheel) first,
                                               # then llmcompressor from PyPI; the project's env is untouched
    nice -n 10 python scripts/bench_peers.py [--key main] \
        [--runs sparsegpt-2:4,sparsegpt-50,wanda-50,recipe_50,recipe_2of4 --threads 1]

Calibration: the quality protocol's 64 x 512 blocks (builtin:imdb train, seed 0; scripts/protocol.py),
tokenised once here and handed to llm-compressor as token ids, so both tools see the very same tokens;
our CLI builds the same blocks itself (their hash is checked against the report). Each run is its own
process, ours and theirs alternating: llm-compressor's `oneshot` with SparseGPTModifier (2:4 and 50%)
and WandaPruningModifier (50%), lm_head ignored, dampening 0.01, block size 128; ours through
`llm-gradprune prune` (sparsegpt 2:4 and 50%, wanda 50%, configs/recipe_50.yaml,
configs/recipe_2of4.yaml). Measured per run: wall time of the whole process (load, calibrate, prune,
save), its peak resident memory (wait4), and the held-out perplexity of the output, every output by the
same command: `llm-gradprune eval OUT --eval-num-samples 64 --eval-seq-len 512 --json`. The dense
model is evaluated once for reference. If llm-compressor is not installed in out/peers-venv or fails,
one line says so and only our runs are made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchjson import command_line, record

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "out" / "peers-venv"
WORK = ROOT / "out" / "bench_peers"
MODEL = "builtin:smollm2-135m"
OURS = {
    "sparsegpt-2:4": ["--criterion", "sparsegpt", "--pattern", "2:4"],
    "sparsegpt-50": ["--criterion", "sparsegpt", "--sparsity", "0.5"],
    "wanda-50": ["--criterion", "wanda", "--sparsity", "0.5"],
    "recipe_50": ["--config", "configs/recipe_50.yaml"],
    "recipe_2of4": ["--config", "configs/recipe_2of4.yaml"],
}
THEIRS = {
    "sparsegpt-2:4": ("sparsegpt", "2:4"),
    "sparsegpt-50": ("sparsegpt", "0:0"),
    "wanda-50": ("wanda", "0:0"),
}
PROTOCOL = [
    "--num-samples",
    "64",
    "--seq-len",
    "512",
    "--batch-size",
    "1",
    "--seed",
    "0",
    "--dtype",
    "float32",
]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def setup() -> int:
    """A separate environment: torch==2.13.0 first (so no other torch can be pulled), then llmcompressor."""
    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pin = VENV / "constraints.txt"
    pin.write_text("torch==2.13.0\n")  # every later install must keep this torch
    pip = [str(venv_python()), "-m", "pip", "install", "-q", "-c", str(pin)]
    for what in (["torch==2.13.0"], ["llmcompressor"]):
        proc = subprocess.run(pip + what, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            print(f"setup: pip install {' '.join(what)} failed in {VENV}: {last[0]}")
            return 1
    print(f"setup: {peer_versions() or 'llmcompressor did not import'} in {VENV}")
    return 0


def peer_versions() -> str | None:
    if not venv_python().exists():
        return None
    code = "import torch, transformers, llmcompressor; print(torch.__version__, transformers.__version__, llmcompressor.__version__)"  # noqa: E501
    proc = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True)
    if proc.returncode:
        return None
    torch_v, tf_v, lc_v = proc.stdout.split()[-3:]
    return f"llmcompressor {lc_v} (torch {torch_v}, transformers {tf_v})"


# -- llm-compressor's side, run by the venv's python: imports nothing of ours ----------------------
def their_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    blocks = torch.load(args.blocks)
    data = Dataset.from_dict(
        {"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    kind = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    extra = {"block_size": 128, "dampening_frac": 0.01} if args.method == "sparsegpt" else {}
    recipe = kind(
        sparsity=0.5, mask_structure=args.mask, targets=["Linear"], ignore=["re:.*lm_head"], **extra
    )
    t = time.perf_counter()
    oneshot(model=model, tokenizer=args.model, dataset=data, recipe=recipe, num_calibration_samples=len(blocks),
            max_seq_length=blocks.shape[1], shuffle_calibration_samples=False, batch_size=1)  # fmt: skip
    seconds = time.perf_counter() - t
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(args.model).iterdir():  # config and tokenizer as they were: a plain transformers folder
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_model(model, str(out / "model.safetensors"))  # tied embeddings saved once, as transformers does
    print(json.dumps({"oneshot_seconds": seconds}))


# -- our side ------------------------------------------------------------------------------------
def prepare_blocks() -> tuple[Path, str, str]:
    import torch
    from transformers import AutoTokenizer

    from llm_gradprune import JobConfig
    from llm_gradprune.calibration.assets import resolve_model
    from llm_gradprune.calibration.data import token_hash
    from llm_gradprune.job.inputs import calibration_samples

    folder = resolve_model(MODEL)
    job = JobConfig.from_flat({"model": MODEL, "dataset": "builtin:imdb", "num_samples": 64, "seq_len": 512,
                               "seed": 0, "progress": False})  # fmt: skip
    blocks = calibration_samples(job, AutoTokenizer.from_pretrained(folder))
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "calib_blocks.pt"
    torch.save(blocks, path)
    return path, folder, token_hash(blocks)


def timed(cmd: list[str], log: Path, env: dict) -> dict:
    """Run one process; wall seconds and its peak resident memory (wait4 reports the child's own)."""
    with open(log, "w") as fh:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode}


def evaluate(folder: str, env: dict) -> dict:
    cmd = ["llm-gradprune", "eval", folder, "--eval-num-samples", "64", "--eval-seq-len", "512", "--json",
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def target_sparsity(folder: Path) -> float | None:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    zeros = total = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if ".layers." in k and k.endswith("proj.weight"):
                    t = fh.get_tensor(k)
                    zeros += int((t == 0).sum())
                    total += t.numel()
    return zeros / total if total else None


def perplexity(result: dict) -> float | None:
    for key in ("perplexity", "ppl"):
        if key in result:
            return float(result[key])
    return None


def write(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help=f"create {VENV} with llmcompressor and exit")
    ap.add_argument("--out", default="out/bench_peers.json", help="the raw result (partial while running)")
    ap.add_argument("--record", default="docs/bench_peers.json", help="merged record file ('' : none)")
    ap.add_argument("--key", default="main", help="the record's key the finished result goes under")
    ap.add_argument("--runs", default=",".join(OURS), help=f"comma list of {', '.join(OURS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run (both tools)")
    ap.add_argument("--their-worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--method", "--mask", "--model", "--blocks"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", dest="out_dir_worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.their_worker:
        args.out = args.out_dir_worker
        their_worker(args)
        return
    if args.setup:
        raise SystemExit(setup())
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in OURS]
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; choose from {', '.join(OURS)}")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    blocks, folder, tokens = prepare_blocks()
    peers = peer_versions()
    if peers is None:
        print(f"llm-compressor: not importable from {venv_python()} (run --setup first): running ours only")
    # ours and theirs alternate: each pair starts with the side the previous pair ended with
    plan, first_ours = [], True
    for name in runs:
        pair = [("ours", name)] + ([("theirs", name)] if peers and name in THEIRS else [])
        plan += pair if first_ours else pair[::-1]
        first_ours = not first_ours if len(pair) == 2 else first_ours
    meta = {"threads": args.threads, "cpus": os.cpu_count(), "peers": peers, "calibration_token_hash": tokens,
            "model": MODEL, "blocks": "64 x 512 builtin:imdb train, seed 0", "plan": plan}  # fmt: skip
    results = {"dense": {"eval": evaluate(MODEL, env)}}
    print(f"dense: perplexity {perplexity(results['dense']['eval'])}", flush=True)
    for side, name in plan:
        out = WORK / f"{side}-{name.replace(':', 'of')}"
        if side == "ours":
            cmd = ["llm-gradprune", "prune", "--model", MODEL, "--dataset", "builtin:imdb", *PROTOCOL, *OURS[name],
                   "--output-dir", str(out), "--overwrite", "--no-eval", "--no-progress", "--threads",
                   str(args.threads)]  # fmt: skip
        else:
            method, mask = THEIRS[name]
            shutil.rmtree(out, ignore_errors=True)
            cmd = [str(venv_python()), str(Path(__file__).resolve()), "--their-worker", "--method", method, "--mask",
                   mask, "--model", folder, "--blocks", str(blocks), "--out-dir", str(out), "--threads",
                   str(args.threads)]  # fmt: skip
        log = WORK / f"{out.name}.log"
        row = {"side": side, "run": name, "command": " ".join(cmd), **timed(cmd, log, env)}
        if row["rc"]:
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            print(f"{side} {name}: failed (exit {row['rc']}): {tail[0]} (log {log})", flush=True)
            row["error"] = tail[0]
        else:
            row["eval"] = evaluate(str(out), env)
            row["perplexity"] = perplexity(row["eval"])
            row["target_sparsity"] = target_sparsity(out)
            report = out / "pruning_report.json"
            if side == "ours" and report.is_file():
                rep = json.loads(report.read_text())
                row["report_timings"] = rep.get("timings_s")
                row["same_blocks"] = tokens in json.dumps(rep)
            print(f"{side:6s} {name:14s} {row['seconds']:7.1f} s  peak RSS {row['peak_rss_mb']:6.0f} MB  "
                  f"perplexity {row['perplexity']}  sparsity {row['target_sparsity']:.4f}", flush=True)  # fmt: skip
        results[f"{side}/{name}"] = row
        write(args.out, {"meta": meta, "results": results, "partial": True})  # a long run keeps what it has
    ratios = {}
    for name in runs:
        a, b = results.get(f"ours/{name}"), results.get(f"theirs/{name}")
        if a and b and not a["rc"] and not b["rc"]:
            ratios[name] = {"time_ours_over_theirs": a["seconds"] / b["seconds"],
                            "rss_ours_over_theirs": a["peak_rss_mb"] / b["peak_rss_mb"]}  # fmt: skip
    their_sgpt = results.get("theirs/sparsegpt-50") or results.get("theirs/sparsegpt-2:4")
    for name in ("recipe_50", "recipe_2of4"):
        ref = (
            results.get("theirs/" + ("sparsegpt-50" if name == "recipe_50" else "sparsegpt-2:4"))
            or their_sgpt
        )
        a = results.get(f"ours/{name}")
        if a and ref and not a["rc"] and not ref["rc"]:
            ratios[name] = {"time_over_their_sparsegpt": a["seconds"] / ref["seconds"]}
    print(f"{'run':14s} {'ours s':>8s} {'theirs s':>9s} {'ratio':>6s} {'ours ppl':>9s} {'theirs ppl':>10s}")
    for name in runs:
        a, b = results.get(f"ours/{name}", {}), results.get(f"theirs/{name}", {})
        r = ratios.get(name, {})
        ratio = r.get("time_ours_over_theirs", r.get("time_over_their_sparsegpt"))
        print(f"{name:14s} {a.get('seconds', float('nan')):8.1f} {b.get('seconds', float('nan')):9.1f} "
              f"{ratio if ratio is None else round(ratio, 3)!s:>6s} {a.get('perplexity')!s:>9.9s} "
              f"{b.get('perplexity')!s:>10.10s}")  # fmt: skip
    final = {"meta": meta, "results": results, "ratios": ratios}
    write(args.out, final)
    print(f"wrote {args.out}")
    if args.record:
        record(args.record, args.key, [command_line()], final)
        print(f"recorded it in {args.record} under {args.key}")


if __name__ == "__main__":
    main()
