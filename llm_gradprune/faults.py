"""Fault-injection hook for the reliability tests: stall at a named point so a test can SIGKILL there.

`LLM_GRADPRUNE_TEST_PAUSE=<kind>:<n>` makes the n-th `pause_point(kind, n)` of the process print a
marker line to stderr and sleep. Kinds: `batch` (after calibration batch n), `save` (inside the n-th
calibration state save, stats written but not yet renamed), `output-write` (pruned checkpoint written
to its temporary folder, not verified), `output-install` (between moving the old output aside and
renaming the new one in). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "LLM_GRADPRUNE_TEST_PAUSE"
MARKER = "LLM_GRADPRUNE_TEST_PAUSED"


def pause_point(kind: str, n: int = 1) -> None:
    if os.environ.get(PAUSE_ENV) == f"{kind}:{n}":
        print(f"{MARKER} {kind}:{n}", file=sys.stderr, flush=True)
        time.sleep(3600)
