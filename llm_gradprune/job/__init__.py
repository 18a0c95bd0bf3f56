"""The job above the pipeline: one skeleton runs every command's work.

    plan and preflight -> load -> text -> evaluate the given model -> transform -> evaluate ->
    recover -> save, verify, push, clean up

The commands differ only in their transform (`transforms.py`): prune (or prune in rounds), shrink
(structured pruning), or nothing (`recover` retrains a pruned folder). Everything that can be checked
without the compute is checked in the plan step, before the model is loaded.
"""

from __future__ import annotations

from typing import Any

from ..config import JobConfig
from .evaluation import eval_job
from .skeleton import run_job
from .transforms import Keep, transform_for

__all__ = ["eval_job", "run_job", "prune_job", "recover_job"]


def prune_job(cfg: JobConfig) -> dict[str, Any]:
    """Prune (or shrink, with `structure`) `cfg.model` and write the checkpoint; returns the report."""
    return run_job(cfg, transform_for(cfg))


def recover_job(cfg: JobConfig) -> dict[str, Any]:
    """`llm-gradprune recover`: masked training of the pruned folder `cfg.model` into `cfg.output_dir`."""
    return run_job(cfg, Keep())
