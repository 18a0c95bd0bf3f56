"""Where a run is, in words, so an interrupted run can say where it stopped ("calibration, batch 5 of 64")."""

from __future__ import annotations

_stage = {"now": "starting"}


def set_stage(text: str) -> None:
    _stage["now"] = text


def stage() -> str:
    return _stage["now"]
