"""`llm-gradprune` command line: a thin shell over the library.

Each subcommand has a parser function and a command function. `prune` takes one flag per
`PruneConfig` field (`num_samples` <-> `--num-samples`), generated from the dataclass so YAML keys and
flags never drift apart; precedence is defaults < `--config` YAML < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

import yaml

from .assets import AssetError
from .config import ConfigError, PruneConfig


def _field_kind(f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(PruneConfig)
    tp = hints[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    return typing.get_origin(tp) or tp


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are shown but not set, so only given flags override YAML."""
    parser.add_argument("--config", help="YAML file whose keys are the flags below (flags win)")
    for f in dataclasses.fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        kind = _field_kind(f)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is list:
            parser.add_argument(flag, nargs="*", metavar="REGEX", **kw)
        elif kind is dict:
            parser.add_argument(flag, type=yaml.safe_load, metavar="YAML", **kw)
        else:
            parser.add_argument(flag, type=kind if kind in (int, float) else str, **kw)


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig) if hasattr(args, f.name)
    }
    if args.config:
        return PruneConfig.from_yaml(args.config, **overrides)
    return PruneConfig.from_dict(overrides)


# -- prune ------------------------------------------------------------------------------------
def prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="calibrate, prune and save a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_config_flags(p)
    p.set_defaults(func=prune_command)


def prune_command(args: argparse.Namespace) -> int:
    from .pipeline import run_prune

    report = run_prune(config_from_args(args))
    if "output_dir" in report:
        print(
            f"pruned {report['targets']} tensors: {report['overall_sparsity']:.4%} of "
            f"{report['target_weights']:,} target weights are zero "
            f"(criterion {report['criterion']}, scope {report['scope']}, pattern {report['pattern']})"
        )
        print(
            f"checkpoint: {report['output_dir']} (verified; loads with AutoModelForCausalLM.from_pretrained)"
        )
        print(
            f"wall time: {report['timings_s']['before_save'] + report['timings_s']['save_and_verify']:.1f} s"
        )
    return 0


# -- eval -------------------------------------------------------------------------------------
def eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model (Hub id, folder, built-in) on held-out text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("model", metavar="MODEL_OR_DIR", help="Hub id, local folder, or builtin:smollm2-135m")
    p.add_argument("--dataset", default="builtin:imdb", help="same sources as prune --dataset")
    p.add_argument("--dataset-config", default=None, help="Hub data set configuration name")
    p.add_argument("--split", default="test", help="split read (builtin/local files: test = held-out part)")
    p.add_argument("--text-column", default="text", help="column holding the text in tabular sources")
    p.add_argument("--num-samples", type=int, default=64, help="windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument(
        "--stride", type=int, default=None, help="score only the last STRIDE tokens of overlapping windows"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the text order")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.set_defaults(func=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    import json

    from .pipeline import run_eval

    cfg = PruneConfig(
        model=args.model, dataset=args.dataset, dataset_config=args.dataset_config,
        eval_split=args.split, text_column=args.text_column, seq_len=args.seq_len,
        eval_num_samples=args.num_samples, eval_seq_len=args.seq_len, eval_batch_size=args.batch_size,
        eval_stride=args.stride, seed=args.seed, dtype=args.dtype, device=args.device,
        trust_remote_code=args.trust_remote_code, progress=args.progress and not args.json,
    )  # fmt: skip
    result = run_eval(cfg)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['ppl']:.3f} (mean NLL {result['nll']:.4f}) of {args.model} on "
            f"{result['tokens']:,} tokens of {args.dataset}[{args.split}] in {result['windows']} windows "
            f"({result['seconds']:.1f} s)"
        )
    return 0


# -- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gradprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prune_parser(sub)
    eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"llm-gradprune: error: {err}", file=sys.stderr)
        return 2
    except AssetError as err:  # an unknown built-in name, or its package missing
        print(f"llm-gradprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
