"""`llm-gradprune recover PRUNED_DIR`: masked recovery training of a pruned checkpoint (pruned weights stay 0)."""

from __future__ import annotations

import argparse

from ..config import JobConfig
from .flags import add_field_flags, given

HELP = "retrain a pruned checkpoint with its pruned weights kept at exactly zero"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "recover",
        help=HELP,
        description=HELP + " (--recover-steps, --recover-lr, --recover-distill-alpha, --recover-lora-r, ...)",
    )
    p.add_argument("model", metavar="PRUNED_DIR", help="an llm-gradprune output folder")
    add_field_flags(p, "recover", params=False)
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    return JobConfig.from_flat({"model": args.model, **given(args, "recover")})


def run(args: argparse.Namespace) -> int:
    from ..job import recover_job

    report = recover_job(config_from_args(args))
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
