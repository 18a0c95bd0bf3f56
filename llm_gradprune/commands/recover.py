"""`llm-gradprune recover PRUNED_DIR`: masked recovery training of a pruned checkpoint (pruned weights stay 0)."""

from __future__ import annotations

import argparse

from ..config import JobConfig
from ..report import Report
from .flags import add_field_flags, given
from .prune import eval_line

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
    print("\n".join(format_text(Report.from_dict(report))))
    return 0


def format_text(r: Report) -> list[str]:
    """The summary `recover` prints: what was trained, how long, the perplexities, where it is."""
    rec = r.recovery
    what = f"the {r.shrinking.structure}-pruned model" if r.structured else f"{r.sparsity.targets} tensors"
    lines = [f"recovered {what} in {rec.steps} steps ({rec.tokens:,} tokens, {rec.seconds:.0f} s): final loss "
             f"{rec.final_loss:.4f}; pruned weights kept at zero: {rec.pruned_kept_zero}"]  # fmt: skip
    if r.eval is not None:
        lines.append(eval_line(r.eval))
    lines.append(f"checkpoint: {r.output_dir} (verified; loads with AutoModelForCausalLM.from_pretrained)")
    return lines
