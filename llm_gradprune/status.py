"""Where a run is, in words, so an interrupted run can say where it stopped ("calibration, batch 5 of 64",
or inside a round: "pruning round 2 of 3, calibration, batch 5 of 64")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_stage = {"now": "starting", "within": ""}


def set_stage(text: str) -> None:
    _stage["now"] = text


def stage() -> str:
    return f"{_stage['within']}, {_stage['now']}" if _stage["within"] else _stage["now"]


@contextmanager
def within(text: str) -> Iterator[None]:
    """Every stage set inside is reported as part of `text` (a round of several). An exception leaves it
    in place, as it leaves the stage: the interrupt handler reports both after the unwinding."""
    outer = _stage["within"]
    _stage["within"] = text
    yield
    _stage["within"] = outer
