"""`llm-gradprune prune`: calibrate, prune, save and verify a checkpoint (flags = every config key)."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..config import JobConfig, read_yaml
from .flags import add_field_flags, given

HELP = "calibrate, prune and save a checkpoint"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help=HELP, description=HELP + "; every YAML key is a flag of the same name")
    p.add_argument("--config", help="YAML file whose keys are the flags below (flags win)")
    add_field_flags(p, "prune")
    return p


def config_from_args(args: argparse.Namespace) -> JobConfig:
    values = read_yaml(args.config) if args.config else {}
    return JobConfig.from_flat({**values, **given(args, "prune")})


def run(args: argparse.Namespace) -> int:
    from ..job import prune_job

    report = prune_job(config_from_args(args))
    if "output_dir" not in report:
        return 0  # not the main process
    if report.get("structure"):
        before, after, shape = report["params_before"], report["params_after"], report["shape_after"]
        print(
            f"removed {report['structure']} by {report['importance']['name']}: {after['decoder']:,} of "
            f"{before['decoder']:,} decoder parameters kept ({report['decoder_kept']:.2%}), {after['total']:,} in all; "
            f"shape {shape['num_hidden_layers']} layers, intermediate {shape['intermediate_size']}, "
            f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads; "
            f"{report['file_bytes_before']:,} -> {report['file_bytes']:,} bytes"
        )
    else:
        print(
            f"pruned {report['targets']} tensors: {report['overall_sparsity']:.4%} of "
            f"{report['target_weights']:,} target weights are zero "
            f"(criterion {report['criterion']}, scope {report['scope']}, pattern {report['pattern']})"
        )
    if report.get("eval"):
        ev = report["eval"]
        print(
            f"held-out perplexity: dense {ev['dense_ppl']:.3f}, pruned {ev['pruned_ppl']:.3f}"
            + (f", recovered {ev['recovered_ppl']:.3f}" if ev.get("recovered_ppl") is not None else "")
            + " "
            f"({ev['windows']} windows, {ev['tokens']:,} tokens of {ev['split']})"
        )
    for note in report.get("notes", []):
        print(f"note: {note}")
    out = report["output_dir"]
    print(f"checkpoint: {out} (verified; loads with AutoModelForCausalLM.from_pretrained)")
    print(f"model card: {out}/README.md")
    print(f"wall time: {report['timings_s']['before_save'] + report['timings_s']['save_and_verify']:.1f} s")
    push = report.get("push")
    if push is None:
        print(
            f"push it with: llm-gradprune push {shlex.quote(out)} --repo-id <you>/<name> --dry-run (then without --dry-run)"
        )
        return 0
    if "error" in push:
        print(
            f"llm-gradprune: error: the checkpoint is saved, but the push failed: {push['error']}",
            file=sys.stderr,
        )
        return 2
    print(f"pushed: {push['url']} ({len(push['files'])} files, {push['total_bytes']:,} bytes)")
    return 0
