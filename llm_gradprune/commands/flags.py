"""CLI flags generated from the config dataclasses, so a YAML key and its flag can never drift apart.

One flag per field (`num_samples` <-> `--num-samples`), grouped by the field's `group`, with its help
and default from the field's metadata; plus one flag per registered criterion or allocation parameter
(`--gblm-alpha`, `--owl-lambda`). Defaults are shown but not set, so only the flags given override a
YAML file. Bad values are left for the config's own validation, which names them in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

import yaml

from ..config import NESTED, JobConfig, PruneConfig, param_aliases
from ..recovery.config import RecoverConfig
from ..registry import Param
from ..scoring.allocation import ALLOCATIONS
from ..scoring.criteria import CRITERIA
from ..structured.config import StructureConfig

GROUP_ORDER = ("model and data", "method", "method parameters", "calibration", "layer-wise", "structure",
               "evaluation", "recovery", "output", "distributed", "resume")  # fmt: skip


def _kind(cls, f: dataclasses.Field) -> Any:
    tp = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    return typing.get_origin(tp) or tp


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices is not None:
        text += f" [{', '.join(choices())}]"
    default = _default(f)
    if default is not None and default != [] and default != {}:
        text += f" (default: {default})"
    return text


def fields_of(names: list[str] | None = None) -> list[tuple[type, dataclasses.Field, str]]:
    """(dataclass, field, flat key) of every setting; recovery settings under `recover_<name>`."""
    out = [(JobConfig, f, f.name) for f in dataclasses.fields(JobConfig) if f.name not in NESTED]
    out += [(PruneConfig, f, f.name) for f in dataclasses.fields(PruneConfig)]
    out += [(StructureConfig, f, f.name) for f in dataclasses.fields(StructureConfig)]
    out += [(RecoverConfig, f, f"recover_{f.name}") for f in dataclasses.fields(RecoverConfig)]
    return [(c, f, k) for c, f, k in out if names is None or k in names]


def add_field_flags(
    parser: argparse.ArgumentParser,
    names: list[str] | None = None,
    params: bool = True,
    rename: dict[str, str] | None = None,
) -> None:
    """Flags for the named fields (all by default) and, with `params`, every registered parameter.
    `rename` gives a field another flag in this command (eval's `--tasks` for `eval_tasks`)."""
    groups: dict[str, argparse._ArgumentGroup] = {}

    def group(title: str):
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    chosen = fields_of(names)
    by_group = {g: [(c, f, k) for c, f, k in chosen if f.metadata.get("group") == g] for g in GROUP_ORDER}
    for title in GROUP_ORDER:
        if title == "method parameters" and params:
            _add_param_flags(group(title))
        for cls, f, key in by_group[title]:
            flag = (rename or {}).get(key) or "--" + key.replace("_", "-")
            kind = _kind(cls, f)
            kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": _help(f)}
            target = group(title)
            if kind is bool:
                target.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif kind is list:
                target.add_argument(flag, nargs="*", metavar="REGEX", **kw)
            elif kind is dict:
                target.add_argument(flag, type=yaml.safe_load, metavar="YAML", **kw)
            else:
                target.add_argument(
                    flag, type=kind if kind in (int, float) else str, metavar=f.name.upper(), **kw
                )


def _add_param_flags(group) -> None:
    for key, (kind, owner, param) in param_aliases().items():
        registry = CRITERIA if kind == "criterion" else ALLOCATIONS
        p: Param = registry.get(owner).params[param]
        help_text = f"{kind} {owner}: {p.help} (default: {p.default})"
        typ = str if p.choices is not None else float
        if p.choices is not None:
            help_text += f" [{', '.join(p.choices)}]"
        group.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=argparse.SUPPRESS,
                           help=help_text, metavar=param.upper())  # fmt: skip


def given(args: argparse.Namespace, names: list[str] | None = None) -> dict[str, Any]:
    """The flags actually given, by flat key (fields and parameter aliases)."""
    keys = [k for _, _, k in fields_of(names)] + list(param_aliases())
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}
