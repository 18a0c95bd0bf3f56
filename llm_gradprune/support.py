"""The support table: which option works on which execution path, as data, checked when a run is planned.

A run takes one of six paths: the whole-model executor or the layer-wise one, each in one process or
over several (a replicated model, data sharded by micro-batch), the whole-model executor over a
model whose rows are sharded with FSDP2, or the layer-wise executor after its whole-model statistics
were taken on such a model (its blocks then stream from the model's files, `offload: disk`). The last
path refuses what either of its halves refuses. `check_support` runs before any model is calibrated (the CLI
calls it before the model is even loaded) and refuses an unsupported combination with one line; the
tests iterate `OPTIONS` x `PATHS` and show each pair applied in the report or refused.

An option is a predicate over the settings plus, per path, None (supported) or the reason it is not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import PruneConfig
from .errors import ConfigError
from .scoring.allocation import ALLOCATIONS
from .scoring.criteria import CRITERIA

# path name -> (executor, several processes, rows sharded)
PATHS = {
    "whole_model": ("whole_model", False, False),
    "whole_model_multi": ("whole_model", True, False),
    "layer_wise": ("layer_wise", False, False),
    "layer_wise_multi": ("layer_wise", True, False),
    "sharded": ("whole_model", True, True),
    "layer_wise_sharded": ("layer_wise", True, True),
}
PATH_TITLES = {
    "whole_model": "whole model",
    "whole_model_multi": "whole model, N processes",
    "layer_wise": "layer-wise",
    "layer_wise_multi": "layer-wise, N processes",
    "sharded": "FSDP2 row shards",
    "layer_wise_sharded": "layer-wise after FSDP2 statistics",
}


@dataclass(frozen=True)
class SupportQuery:
    """What the support table looks at: the pruning settings and how the job around them runs."""

    prune: PruneConfig
    processes: int = 1
    sharded: bool = False
    job: Mapping[str, Any] = field(default_factory=dict)  # the job's flat settings (JobConfig.to_flat())

    def asks(self, key: str) -> bool:
        """Is the job setting `key` on (true, non-zero, non-empty)? A new job option needs no field here:
        its support row reads it by name."""
        return bool(self.job.get(key))

    @property
    def resume(self) -> bool:
        return self.asks("save_state_every") or self.asks("resume")

    @property
    def path(self) -> str:
        if self.sharded:
            return "layer_wise_sharded" if self.prune.layer_wise else "sharded"
        name = "layer_wise" if self.prune.layer_wise else "whole_model"
        return name + ("_multi" if self.processes > 1 else "")


def _reads(run: SupportQuery, stat: str) -> bool:
    p = run.prune
    needs = CRITERIA.get(p.criterion).statistics(p.criterion_params) | set(
        ALLOCATIONS.get(p.allocation).needs
    )
    return stat in needs


@dataclass(frozen=True)
class Option:
    name: str
    active: Callable[[SupportQuery], bool]
    refused: dict[str, str] = field(default_factory=dict)  # path -> reason
    example: dict = field(default_factory=dict)  # settings that turn it on (for the tests and the docs)
    layer_wise_only: bool = False  # it makes a run layer-wise: it never meets a whole-model path


ONE_PROCESS = "per-rank partial sums cannot be resumed: run one process"
STREAMED = (
    "after the sharded statistics the blocks stream from the model's files (offload disk), so the whole "
    "pruned model is never held: run it on the output afterwards"
)
OPTIONS: list[Option] = [
    Option("layer-wise mode", lambda r: r.prune.layer_wise, {}, {"reconstruct": "obs"}, layer_wise_only=True),
    Option("per-token gradient statistics (token_fisher)", lambda r: _reads(r, "token_grad_sq_mean"),
           {"sharded": "its per-token sums would need an unsharded [out, in] copy on every rank: use fisher, "
                       "or a replicated model"},
           {"criterion": "token_fisher"}),
    Option("scores that read whole columns (ria)", lambda r: not CRITERIA.get(r.prune.criterion).row_local,
           {"sharded": "its column sums add |w_ij| over every row, and each rank holds some rows only: "
                       "run it on a replicated model"},
           {"criterion": "ria"}),
    Option("scope global with a block-local criterion (block_fisher, regional)",
           lambda r: r.prune.scope == "global" and CRITERIA.get(r.prune.criterion).block_local,
           {p: "its statistics exist one decoder block at a time, so no threshold over the whole model is known "
               "before the first block is pruned: use scope row or tensor, or a pattern N:M"
            for p, (executor, _, _) in PATHS.items() if executor == "layer_wise"},
           {"criterion": "block_fisher", "scope": "global", "allow_empty_tensors": True}, layer_wise_only=True),
    Option("scope global with activation scores",
           lambda r: r.prune.scope == "global" and CRITERIA.get(r.prune.criterion).reads_activations,
           {p: "its scores read each block's pruned-input activations, which exist one block at a time: use "
               "scope row/tensor, or a criterion without activation statistics"
            for p in ("layer_wise", "layer_wise_multi")},
           {"criterion": "wanda", "scope": "global", "allow_empty_tensors": True}),
    Option("allocation owl", lambda r: r.prune.allocation == "owl", {},
           {"allocation": "owl", "allocation_params": {"m": 2.0, "lambda": 0.2}}),
    Option("grad_accum > 1", lambda r: r.prune.grad_accum > 1, {}, {"criterion": "fisher", "grad_accum": 2}),
    Option("stats_device cpu", lambda r: r.prune.stats_device == "cpu", {}, {"criterion": "fisher", "stats_device": "cpu"}),
    Option("gradient_checkpointing", lambda r: r.prune.gradient_checkpointing, {},
           {"criterion": "fisher", "gradient_checkpointing": True}),
    Option("scores_dir", lambda r: r.prune.scores_dir is not None, {},
           {"criterion": "fisher", "scope": "global", "scores_dir": "{tmp}/scores", "allow_empty_tensors": True}),
    Option("pattern N:M", lambda r: r.prune.nm is not None, {}, {"criterion": "fisher", "pattern": "2:4"}),
    # before the plain resume row: with rounds this reason is the one that applies on every path
    Option("save_state_every / resume with rounds", lambda r: r.resume and r.prune.rounds > 1,
           {p: "each round recalibrates the model the rounds before it pruned, so no single calibration state "
               "describes the run: prune in one round to resume, or without save_state_every"
            for p in PATHS},
           {"criterion": "fisher", "save_state_every": 2, "rounds": 2}),
    Option("save_state_every / resume", lambda r: r.resume,
           {"whole_model_multi": ONE_PROCESS, "layer_wise_multi": ONE_PROCESS,
            "layer_wise": "only the whole-model calibration is resumable, not a layer-wise pass",
            "sharded": ONE_PROCESS},
           {"criterion": "fisher", "save_state_every": 2}),
    Option("eval (perplexity before and after)", lambda r: r.asks("eval"), {"layer_wise_sharded": STREAMED}, {"eval": True, "eval_num_samples": 2}),
    Option("eval tasks (lm-eval)", lambda r: r.asks("eval_tasks"),
           {"sharded": "lm-eval scores a whole model in one process: run llm-gradprune eval --tasks on the output"},
           {"eval_tasks": "tiny_mc", "eval_tasks_include_path": "{tasks}"}),
    Option("pruning in rounds", lambda r: r.prune.rounds > 1, {"layer_wise_sharded": STREAMED}, {"rounds": 2}),
    Option("recovery training", lambda r: r.asks("recover_steps"), {"layer_wise_sharded": STREAMED},
           {"recover_steps": 2, "recover_batch_size": 1, "recover_lr": 1e-3}),
    Option("fsdp", lambda r: r.asks("fsdp"),
           {p: "fsdp shards the weights over several processes: launch with accelerate launch --num_processes N"
            for p in ("whole_model", "layer_wise")},
           {"fsdp": True}),
]  # fmt: skip
for _option in OPTIONS:  # layer-wise after FSDP2 statistics refuses what either of its halves refuses
    _reason = _option.refused.get("sharded") or _option.refused.get("layer_wise_multi")
    if _reason is not None:
        _option.refused.setdefault("layer_wise_sharded", _reason)


def refusal(run: SupportQuery) -> str | None:
    """The first reason this run is not supported, or None."""
    for option in OPTIONS:
        reason = option.refused.get(run.path)
        if reason is not None and option.active(run):
            return f"{option.name} is not supported on the {PATH_TITLES[run.path]} path: {reason}"
    return None


def check_support(run: SupportQuery) -> None:
    reason = refusal(run)
    if reason is not None:
        raise ConfigError(reason)


def applies(option: Option, path: str) -> bool:
    """False where an option cannot meet a path at all (one that makes a run layer-wise, on a whole-model path)."""
    return not (option.layer_wise_only and PATHS[path][0] == "whole_model")
