"""One registry per concept (criteria, scopes, allocations, update rules, statistics, commands).

Config validation, CLI choices, help text and the docs tables all read the registry, so a name is
listed once: where it is registered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Ordered name -> entry; `get` refuses an unknown name with one line listing the known ones."""

    def __init__(self, concept: str):
        self.concept = concept
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.concept} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"{self.concept} {name!r} is unknown: choose one of {', '.join(self._items)}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()


@dataclass(frozen=True)
class Param:
    """One parameter of a criterion or allocation: default, help, and the values allowed."""

    default: Any
    help: str
    low: float | None = 0.0  # numbers: inclusive lower bound (None: any number)
    choices: tuple[str, ...] | None = None

    def check(self, owner: str, name: str, value: Any) -> Any:
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigError(
                    f"{owner} parameter {name} {value!r} is not one of {', '.join(self.choices)}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{owner} parameter {name} {value!r} must be a number")
        if self.low is not None and value < self.low:
            raise ConfigError(f"{owner} parameter {name} {value!r} must be >= {self.low:g}")
        return float(value)


def resolve_params(owner: str, declared: dict[str, Param], given: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in, every given value checked; an undeclared name is refused with a hint."""
    given = dict(given or {})
    for key in given:
        if key not in declared:
            allowed = ", ".join(declared) if declared else "none"
            raise ConfigError(f"{owner} has no parameter {key!r} (its parameters: {allowed})")
    return {k: p.check(owner, k, given.get(k, p.default)) for k, p in declared.items()}
