"""`llm-gradprune recover PRUNED_DIR`: masked recovery training of a pruned checkpoint (pruned weights stay 0)."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import JobConfig
from ..recovery.config import RecoverConfig
from .flags import add_field_flags, given

HELP = "retrain a pruned checkpoint with its pruned weights kept at exactly zero"
JOB_FIELDS = ["dataset", "dataset_config", "split", "text_column", "dtype", "trust_remote_code", "device",
              "eval", "eval_split", "eval_num_samples", "eval_seq_len", "eval_batch_size", "eval_stride",
              "output_dir", "overwrite", "max_shard_size", "resume", "progress"]  # fmt: skip
TRAIN_FIELDS = [f"recover_{f.name}" for f in dataclasses.fields(RecoverConfig) if f.name != "round_steps"]
RENAME = {k: "--" + k.removeprefix("recover_").replace("_", "-") for k in TRAIN_FIELDS}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "recover", help=HELP, description=HELP + " (--steps, --lr, --distill-alpha, --lora-r, ...)"
    )
    p.add_argument("model", metavar="PRUNED_DIR", help="an llm-gradprune output folder")
    add_field_flags(p, JOB_FIELDS + TRAIN_FIELDS, params=False, rename=RENAME)
    return p


def run(args: argparse.Namespace) -> int:
    from ..job import run_recover

    report = run_recover(JobConfig.from_flat({"model": args.model, **given(args, JOB_FIELDS + TRAIN_FIELDS)}))
    if "output_dir" not in report:
        return 0
    rec = report["recovery"]
    what = (
        f"{report['targets']} tensors" if "targets" in report else f"the {report['structure']}-pruned model"
    )
    print(f"recovered {what} in {rec['steps']} steps ({rec['tokens']:,} tokens, "
          f"{rec['seconds']:.0f} s): final loss {rec['final_loss']:.4f}; pruned weights kept at zero: "
          f"{rec['pruned_kept_zero']}")  # fmt: skip
    if report.get("eval"):
        ev = report["eval"]
        print(f"held-out perplexity: pruned {ev['pruned_ppl']:.3f}, recovered {ev['recovered_ppl']:.3f} "
              f"({ev['windows']} windows, {ev['tokens']:,} tokens of {ev['split']})")  # fmt: skip
    print(f"checkpoint: {report['output_dir']} (verified; loads with AutoModelForCausalLM.from_pretrained)")
    return 0
