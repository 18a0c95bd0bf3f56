"""`llm-gradprune prune`: calibrate, prune, save and verify a checkpoint (flags = every config key)."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..config import JobConfig, read_yaml
from ..errors import ConfigError
from ..io.checkpoint import check_not_an_input
from ..io.coverage import summary_counts
from ..report import Report
from .flags import add_field_flags, given

HELP = "calibrate, prune and save a checkpoint"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help=HELP, description=HELP + "; every YAML key is a flag of the same name")
    p.add_argument("--config", help="YAML file whose keys are the flags below (flags win)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (path, targets, statistics, memory per "
                   "offload mode, time) without loading any weight; exit 2 if the run cannot fit here")  # fmt: skip
    add_field_flags(p, "prune")
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    values = read_yaml(args.config) if args.config else {}
    cfg = JobConfig.from_flat({**values, **given(args, "prune")})
    if args.config:  # the YAML file is an input too: an output folder holding it would delete it
        check_not_an_input(cfg.output_dir, {"config file": args.config})
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return dry_run(config_from_args(args))
    from ..job import prune_job

    report = prune_job(config_from_args(args))
    if "output_dir" not in report:
        return 0  # not the main process
    r = Report.from_dict(report)
    print("\n".join(format_text(r)))
    if r.push is not None and r.push.error:
        print(
            f"llm-gradprune: error: the checkpoint is saved, but the push failed: {r.push.error}",
            file=sys.stderr,
        )
        return 2
    return 0


def dry_run(cfg: JobConfig) -> int:
    """Print the plan; a run that cannot fit here ends in its one-line refusal (exit 2)."""
    from ..job.dry_run import dry_run as plan
    from ..parallel import world

    result = plan(cfg)
    if world()[0] == 0:  # launched over several processes, each plans its share: one prints it
        print("\n".join(result.lines), flush=True)
    if result.refusal:
        raise ConfigError(result.refusal)
    return 0


def outcome_line(r: Report) -> str:
    """What was removed or zeroed, in one line."""
    if r.structured:
        s = r.shrinking
        before, after, shape = s.params_before, s.params_after, s.shape_after
        counts = ", ".join(f"{key} {value}" for key, _, value in shape.rows())
        return (f"removed {s.structure} by {s.importance.name}: {after.decoder:,} of {before.decoder:,} decoder "
                f"parameters kept ({s.decoder_kept:.2%}), {after.total:,} in all; shape {counts}; "
                f"{s.file_bytes_before:,} -> {r.file_bytes:,} bytes")  # fmt: skip
    p = r.sparsity
    kinds = summary_counts(p)
    return (f"pruned {p.targets} tensors: {p.overall_sparsity:.4%} of {p.target_weights:,} target weights are zero "
            f"(criterion {p.criterion}, scope {p.scope}, pattern {p.pattern})" + (f"; {kinds}" if kinds else ""))  # fmt: skip


def eval_line(ev) -> str:
    """Held-out perplexity before and after (and after recovery), on the same windows."""
    scores = [(n, v) for n, v in (("dense", ev.dense_ppl), ("pruned", ev.pruned_ppl), ("recovered", ev.recovered_ppl))
              if v is not None]  # fmt: skip
    shown = ", ".join(f"{n} {v:.3f}" for n, v in scores)
    return f"held-out perplexity: {shown} ({ev.windows} windows, {ev.tokens:,} tokens of {ev.split})"


def format_text(r: Report) -> list[str]:
    """The summary `prune` prints: what changed, its quality, where it is, how to push it. The run's notes
    are not repeated: planning logged each one as it was made, and the report keeps them."""
    lines = [outcome_line(r)]
    if r.eval is not None:
        lines.append(eval_line(r.eval))
    out = r.output_dir
    lines += [f"checkpoint: {out} (verified; loads with AutoModelForCausalLM.from_pretrained)",
              f"model card: {out}/README.md",
              f"wall time: {r.timings_s['before_save'] + r.timings_s['save_and_verify']:.1f} s"]  # fmt: skip
    if r.push is None:
        lines.append(f"push it with: llm-gradprune push {shlex.quote(out)} --repo-id <you>/<name> --dry-run "
                     "(then without --dry-run)")  # fmt: skip
    elif not r.push.error:
        lines.append(f"pushed: {r.push.url} ({len(r.push.files)} files, {r.push.total_bytes:,} bytes)")
    return lines
