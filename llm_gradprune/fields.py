"""Settings are declared once, as dataclass fields made by `setting(...)`, and checked once, by `validate`.

A field's metadata holds a `Setting`: its help text and help section; the values it accepts (its type from
the annotation, `choices`, a `range` such as `"[0, 1)"` or `">= 1"`, None where the annotation is
optional, `unless`: refused when changed from its default while a condition fails); and where it applies
(`commands` that take it as a flag, `run_control`: it steers the run without changing its result, so a
resume may change it; `structured`: a pruning setting that a structured run uses too). The validator, the
CLI flags (`commands/flags.py`), the flat YAML keys and the resume identity (`JobConfig.identity`) all
read this one declaration, so adding an option is adding one field.

A config class may set `flat_prefix` (`RecoverConfig`: `recover_`): its settings are then known under
`<prefix><name>` everywhere a user sees them (YAML keys, flags, error messages).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import ConfigError

FLAG_COMMANDS = ("prune", "eval", "recover")  # the commands whose flags are generated from settings


@dataclass(frozen=True)
class Range:
    """An interval of numbers, written as in the messages: `[0, 1)`, `(0, 10]`, `>= 1`, `> 0`."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    @classmethod
    def parse(cls, text: str) -> Range:
        num = r"\s*(-?\d+(?:\.\d+)?)\s*"
        if m := re.fullmatch(r"\s*(>=|>)" + num, text):
            return cls(float(m.group(2)), low_open=m.group(1) == ">")
        if m := re.fullmatch(r"\s*([\[(])" + num + "," + num + r"([\])])\s*", text):
            return cls(float(m.group(2)), float(m.group(3)), m.group(1) == "(", m.group(4) == ")")
        raise ValueError(f"range {text!r} is neither '[a, b)'-like nor '>= a'-like")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def interval(self) -> str:
        high = "inf" if self.high == math.inf else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}{')' if self.high_open else ']'}"

    @property
    def phrase(self) -> str:
        """How a message says it: `>= 0` when only bounded below, else `in [0, 1)`."""
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {self.interval}"


@dataclass(frozen=True)
class Setting:
    """The metadata of one setting (see the module docstring)."""

    help: str
    section: str  # the --help section it is listed in
    choices: Callable[[], tuple[str, ...]] | None = None
    range: Range | None = None
    unless: tuple[Callable[[Any], bool], str] | None = None  # (condition on the config, the refusal's words)
    commands: tuple[str, ...] = ("prune",)
    run_control: bool = False
    structured: bool = False


def setting(
    default: Any,
    help: str,
    section: str,
    *,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    range: str | None = None,
    unless: tuple[Callable[[Any], bool], str] | None = None,
    commands: tuple[str, ...] = ("prune",),
    run_control: bool = False,
    structured: bool = False,
) -> Any:
    """A dataclass field declaring one setting; `choices` may be a callable (a registry's `names`)."""
    unknown = set(commands) - set(FLAG_COMMANDS)
    if unknown:
        raise ValueError(f"commands {sorted(unknown)} are not among {FLAG_COMMANDS}")
    if choices is not None and not callable(choices):
        choices = functools.partial(tuple, choices)
    meta = {"setting": Setting(help, section, choices, None if range is None else Range.parse(range), unless,
                               tuple(commands), run_control, structured)}  # fmt: skip
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def setting_of(f: dataclasses.Field) -> Setting | None:
    """The `Setting` of a field, or None for a field that is not one (a nested config)."""
    return f.metadata.get("setting")


def flat_key(cls: type, name: str) -> str:
    """The key a user sees for field `name` of config class `cls` (YAML, flag, messages)."""
    return getattr(cls, "flat_prefix", "") + name


class Declared(NamedTuple):
    """One setting of a config class, as the validator, the flags and the flat keys read it."""

    key: str  # the flat key (`recover_lr`)
    field: dataclasses.Field
    spec: Setting
    kind: type  # bool, int, float, str, list or dict, from the annotation
    optional: bool  # None is allowed


@functools.cache
def declared(cls: type) -> tuple[Declared, ...]:
    """Every setting of config class `cls`, in field order (a nested config is not one)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = setting_of(f)
        if spec is None:
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1
        tp = args[0] if optional else tp
        out.append(Declared(flat_key(cls, f.name), f, spec, typing.get_origin(tp) or tp, optional))
    return tuple(out)


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _number_text(value: Any) -> Any:
    """A string that reads as a number, as that number: YAML 1.1 reads `1e-4` (no dot) as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _checked(key: str, value: Any, spec: Setting, kind: type) -> Any:
    """`value` as the setting holds it (ints as floats for a float, a lone string as a list), or a refusal."""
    rng = spec.range
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} {value!r} must be true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or (rng and value not in rng)):
        raise ConfigError(f"{key} {value!r} must be an integer" + (f" {rng.phrase}" if rng else ""))
    if kind is float:
        value = _number_text(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} {value!r} must be a number" + (f" {rng.phrase}" if rng else ""))
        if not math.isfinite(value):  # inf passes a '> 0' range, and nan fails every test silently
            raise ConfigError(f"{key} {value!r} must be a finite number" + (f" {rng.phrase}" if rng else ""))
        if rng and value not in rng:
            # a one-sided range reads as its bound ('must be > 0'), not as an interval ending at inf
            bound = f"must be {rng.phrase}" if rng.high == math.inf else f"is outside {rng.interval}"
            raise ConfigError(f"{key} {value!r} {bound}")
        value = float(value)
    if kind is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} {value!r} must be a list")
        value = list(value)
    if kind is dict and not isinstance(value, dict):
        raise ConfigError(f"{key} {value!r} must map names to values")
    if spec.choices is not None and value not in spec.choices():
        raise ConfigError(f"{key} {value!r} is unknown: choose one of {', '.join(spec.choices())}")
    return value


def validate(obj: Any) -> None:
    """Check every setting of config `obj` in place: type, choices and range, then each `unless` refusal.

    One line per refusal, naming the key and the value. Runs first in a config's `__post_init__`; rules
    that tie several settings together stay in code there.
    """
    settings = declared(type(obj))
    for d in settings:
        value = getattr(obj, d.field.name)
        if not (d.optional and value is None):
            setattr(obj, d.field.name, _checked(d.key, value, d.spec, d.kind))
    for d in settings:
        value = getattr(obj, d.field.name)
        if d.spec.unless is not None and value != default_of(d.field) and not d.spec.unless[0](obj):
            raise ConfigError(f"{d.key} {value!r} {d.spec.unless[1]}")
