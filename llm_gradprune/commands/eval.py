"""`llm-gradprune eval MODEL`: perplexity of any model on held-out text (flags are prune's names)."""

from __future__ import annotations

import argparse
import json

from ..config import JobConfig
from .flags import add_field_flags, given

HELP = "perplexity of a model (Hub id, folder, built-in) on held-out text"
FIELDS = ["dataset", "dataset_config", "text_column", "seed", "dtype", "trust_remote_code", "eval_split",
          "eval_num_samples", "eval_seq_len", "eval_batch_size", "eval_stride", "device", "progress"]  # fmt: skip


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("model", metavar="MODEL_OR_DIR", help="Hub id, local folder, or builtin:smollm2-135m")
    add_field_flags(p, FIELDS, params=False)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from ..job import run_eval

    values = given(args, FIELDS)
    if args.json:
        values["progress"] = False
    cfg = JobConfig.from_flat({"model": args.model, **values})
    result = run_eval(cfg)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['ppl']:.3f} (mean NLL {result['nll']:.4f}) of {args.model} on "
            f"{result['tokens']:,} tokens of {cfg.dataset}[{cfg.eval_split}] in {result['windows']} windows "
            f"({result['seconds']:.1f} s)"
        )
    return 0
