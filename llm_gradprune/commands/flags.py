"""CLI flags generated from the config dataclasses, so a YAML key and its flag can never drift apart.

One flag per setting a command takes (`num_samples` <-> `--num-samples`, `recover_lr` <-> `--recover-lr`),
in its help section, with its help, choices and default from its `fields.Setting`; plus one flag
per registered criterion or allocation parameter (`--gblm-alpha`, `--owl-lambda`). Defaults are shown but
not set, so only the flags given override a YAML file. Bad values are left for the config's own
validation, which names them in one line.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from ..config import flat_settings, param_aliases, parse_yaml
from ..fields import Declared, default_of
from ..registry import Param
from ..scoring.allocation import ALLOCATIONS
from ..scoring.criteria import CRITERIA

SECTION_ORDER = ("model and data", "method", "method parameters", "calibration", "layer-wise", "structure",
               "evaluation", "recovery", "output", "distributed", "resume")  # fmt: skip


def _help(d: Declared) -> str:
    text = d.spec.help
    if d.spec.choices is not None:
        text += f" [{', '.join(d.spec.choices())}]"
    default = default_of(d.field)
    if default is not None and default != [] and default != {}:
        text += f" (default: {default})"
    return text


def fields_of(command: str) -> list[Declared]:
    """Every setting `command` takes as a flag."""
    return [d for _, d in flat_settings() if command in d.spec.commands]


def add_field_flags(
    parser: argparse.ArgumentParser, command: str, params: bool = True, rename: dict[str, str] | None = None
) -> None:
    """A flag for each setting `command` takes and, with `params`, each registered parameter.
    `rename` gives a setting another flag in this command (eval's `--tasks` for `eval_tasks`)."""
    sections: dict[str, argparse._ArgumentGroup] = {}

    def section(title: str):  # argparse calls it an argument group
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        return sections[title]

    chosen = fields_of(command)
    for title in SECTION_ORDER:
        if title == "method parameters" and params:
            _add_param_flags(section(title))
        for d in (d for d in chosen if d.spec.section == title):
            flag = (rename or {}).get(d.key) or "--" + d.key.replace("_", "-")
            kw: dict[str, Any] = {"dest": d.key, "default": argparse.SUPPRESS, "help": _help(d)}
            target = section(title)
            if d.kind is bool:
                target.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif d.kind is list:
                target.add_argument(flag, nargs="*", metavar="REGEX", **kw)
            elif d.kind is dict:
                target.add_argument(flag, type=_yaml_value, metavar="YAML", **kw)
            else:
                metavar = d.field.name.upper()
                target.add_argument(
                    flag, type=d.kind if d.kind in (int, float) else str, metavar=metavar, **kw
                )


def _yaml_value(text: str) -> Any:
    """A YAML flag value read as a config file is; a syntax error is argparse's one-line error."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid YAML: {getattr(err, 'problem', err)}"
        ) from None


def _add_param_flags(section) -> None:
    for key, (kind, owner, param) in param_aliases().items():
        registry = CRITERIA if kind == "criterion" else ALLOCATIONS
        p: Param = registry.get(owner).params[param]
        help_text = f"{kind} {owner}: {p.help} (default: {p.default})"
        typ = str if p.choices is not None else float
        if p.choices is not None:
            help_text += f" [{', '.join(p.choices)}]"
        section.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=argparse.SUPPRESS,
                           help=help_text, metavar=param.upper())  # fmt: skip


def given(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The flags of `command` actually given, by flat key (settings and parameter aliases)."""
    keys = [d.key for d in fields_of(command)] + list(param_aliases())
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}
