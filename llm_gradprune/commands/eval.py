"""`llm-gradprune eval MODEL`: perplexity of any model on held-out text (flags are prune's names)."""

from __future__ import annotations

import argparse
import json

from ..config import JobConfig
from ..errors import ConfigError
from .flags import add_field_flags, given

HELP = "perplexity of a model (Hub id, folder, built-in) on held-out text, or lm-eval task scores (--tasks)"
# shorter names here, where every flag is about evaluation (lm-eval's own spellings)
RENAME = {"eval_tasks": "--tasks", "eval_tasks_include_path": "--include-path", "eval_tasks_limit": "--limit",
          "eval_tasks_fewshot": "--num-fewshot"}  # fmt: skip


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("model", metavar="MODEL_OR_DIR", help="Hub id, local folder, or builtin:smollm2-135m")
    add_field_flags(p, "eval", params=False, rename=RENAME)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from ..job import eval_job

    values = given(args, "eval")
    if values.get("eval_tasks") == []:  # a bare --tasks would silently score perplexity instead
        raise ConfigError(
            "--tasks names no task: give names such as boolq,arc_easy, or drop it for perplexity"
        )
    if args.json:
        values["progress"] = False
    cfg = JobConfig.from_flat({"model": args.model, **values})
    result = eval_job(cfg)
    if args.json:
        print(json.dumps(result))
    elif "tasks" in result:
        print(f"lm-eval {result['lm_eval_version']} on {args.model} ({result['num_fewshot']} shots):")
        for task, scores in result["tasks"].items():
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in scores.items() if k != "samples" and "stderr" not in k
            )
            print(f"  {task}: {shown} ({scores['samples']} examples)")
    else:
        print(
            f"perplexity {result['ppl']:.3f} (mean NLL {result['nll']:.4f}) of {args.model} on "
            f"{result['tokens']:,} tokens of {cfg.dataset}[{cfg.eval_split}] in {result['windows']} windows "
            f"({result['seconds']:.1f} s)"
        )
    return 0
