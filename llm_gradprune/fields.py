"""The one way settings are declared: a dataclass field with its help text and CLI group in its metadata.

Every config (`config.PruneConfig`, `config.JobConfig`, `recovery.config.RecoverConfig`, ...) uses
`_f`, and `commands/flags.py` turns such fields into flags, so a YAML key and its flag never drift.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def _f(default: Any, help: str, group: str, **kw: Any) -> Any:
    meta = {"help": help, "group": group, **kw}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)
