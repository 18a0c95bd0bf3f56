"""The settings of a run, as dataclasses: what pruning needs apart from the job around it.

- `PruneConfig`: what `prune_` needs: the method (criterion and its parameters, sparsity, scope,
  pattern, allocation, update rule, targets), calibration settings and layer-wise settings.
- `JobConfig`: the job around it: model, text, evaluation, output folder, devices, resume; it holds
  one `PruneConfig` as `prune`, one `RecoverConfig` as `recover` and, for a structured run, one
  `StructureConfig` as `structured`.

Every setting is one field made by `fields.setting`: its type, choices, range, the commands that take
it and whether it is run control are read from there by the validator, the flags, the flat keys and
`JobConfig.identity`. YAML files and CLI flags use the same flat keys (`criterion: fisher`,
`--num-samples 64`, `recover_lr` / `--recover-lr`): `JobConfig.from_flat` sorts every key into its
dataclass, and a criterion's or allocation's parameters may be given as `<name>_<param>`
(`gblm_alpha: 100`, `--owl-lambda 0.1`) as well as in `criterion_params`. Validation happens once, in
`__post_init__` (`fields.validate`, then the rules between settings), and raises `ConfigError` with a
one-line message naming the bad value; a setting that another one fixes is refused when it conflicts
and reported in `notes` when its default was replaced.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .calibration.assets import unreachable_path
from .calibration.stats import STATISTICS
from .errors import ConfigError
from .fields import FLAG_COMMANDS, Declared, declared, default_of, flat_key, setting, validate
from .reconstruction.rules import UPDATES
from .recovery.config import RecoverConfig
from .scoring.allocation import ALLOCATIONS
from .scoring.criteria import CRITERIA
from .selection.masks import SCOPES
from .structured.config import STRUCTURES, StructureConfig
from .structured.importance import IMPORTANCES

PRUNE_EVAL, PRUNE_RECOVER = ("prune", "eval"), ("prune", "recover")  # commands taking a setting
DTYPES = ("float32", "bfloat16", "float16")
ROUND_SCHEDULES = ("cubic", "linear")
STATS_DEVICES = ("same", "cpu")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`"unstructured"` -> None; `"2:4"` -> (2, 4): keep N of every M consecutive input weights."""
    if pattern == "unstructured":
        return None
    parts = str(pattern).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"pattern {pattern!r} is not allowed: use 'unstructured' or 'N:M' such as '2:4'")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern!r} is not allowed: N:M needs 0 < N < M (keep N of every M)")
    return n, m


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(value: str | int, name: str = "max_shard_size") -> int:
    """`"5GB"` -> 5_000_000_000, `"500MiB"` -> bytes, an integer as is; anything else is refused."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{name} {value!r} is not a size: use a number of bytes or e.g. 500MB, 5GB, 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass
class PruneConfig:
    """What `prune_` needs: method, calibration and layer-wise settings (no paths of the job)."""

    # -- method --------------------------------------------------------------------------------
    criterion: str = setting("token_fisher", "importance score", "method", choices=CRITERIA.names)
    criterion_params: dict = setting(
        {}, "parameters of the criterion (or flags --<criterion>-<param>)", "method"
    )
    sparsity: float | None = setting(
        None, "fraction of target weights set to zero, in [0, 1) (default 0.5; N:M fixes it at (M-N)/M)",
        "method", range="[0, 1)")  # fmt: skip
    scope: str | None = setting(
        None,
        "weights that compete for one budget (default row; N:M patterns and sparsegpt choose their own)",
        "method",
        choices=SCOPES.names,
    )
    pattern: str = setting(
        "unstructured", "unstructured, or N:M such as 2:4 (keep N of every M input weights)", "method"
    )
    allocation: str = setting("uniform", "sparsity per decoder layer", "method", choices=ALLOCATIONS.names)
    allocation_params: dict = setting(
        {}, "parameters of the allocation (or flags --<allocation>-<param>)", "method"
    )
    reconstruct: str | None = setting(
        None, "update of the kept weights once the mask is fixed (default: obs for sparsegpt, else none)", "method",
        choices=UPDATES.names,
    )  # fmt: skip
    rounds: int = setting(1, "prune in this many rounds towards the target, recalibrating on the pruned model each "
                          "time", "method", range=">= 1")  # fmt: skip
    round_schedule: str = setting(
        "cubic", "sparsity after round r of K: cubic s(1-(1-r/K)^3) (Zhu & Gupta, 2017) or linear s r/K", "method",
        choices=ROUND_SCHEDULES,
    )  # fmt: skip
    include: list[str] = setting(
        [], "regexes over module names; a target must match one (empty = all)", "method"
    )
    exclude: list[str] = setting([], "regexes over module names; a match is never pruned", "method")
    allow_empty_tensors: bool = setting(
        False, "allow a selection that zeroes a whole target tensor (refused by default)", "method",
        run_control=True,  # a check on the result, not a change of it
    )  # fmt: skip
    # -- calibration ---------------------------------------------------------------------------
    grad_accum: int = setting(
        1,
        "micro-batches summed into one gradient (the mean gradient of grad_accum x batch_size "
        "blocks); > 1 costs one fp32 buffer per target weight",
        "calibration",
        range=">= 1",
    )
    stats_device: str = setting(
        "same",
        "where gradient statistics live: same (as each weight) or cpu (pinned, non-blocking copies "
        "from a GPU; the GPU then holds model + activations only)",
        "calibration",
        choices=STATS_DEVICES,
    )
    gradient_checkpointing: bool = setting(
        False,
        "recompute layer activations in backward (transformers' own): less memory, ~1.3x time",
        "calibration",
    )
    select_chunk_elems: int = setting(
        1 << 24,
        "scores looked at per chunk in exact selection, and elements per cross-process sum (bounds memory)",
        "calibration",
        range=">= 1",
        run_control=True,
    )
    scores_dir: str | None = setting(
        None,
        "global scope: hold scores on disk in a temporary folder under this one (RAM = one chunk); "
        "default: recompute them in memory",
        "calibration",
        unless=(lambda p: p.scope == "global" and p.pattern == "unstructured",
                "is used only by the unstructured global scope"),
    )  # fmt: skip
    threads: int | None = setting(
        None,
        "CPU threads for calibration and layer-wise pruning (default: every core this process may use, "
        "shared among the processes of this machine)",
        "calibration",
        range=">= 1",
        run_control=True,
        structured=True,
    )
    progress: bool = setting(
        True, "show progress bars", "output", commands=FLAG_COMMANDS, run_control=True, structured=True
    )
    # -- layer-wise ----------------------------------------------------------------------------
    sequential: bool | None = setting(
        None,
        "layer-wise mode, each block calibrated on the outputs of the already-pruned blocks before it "
        "(default: on for sparsegpt, reconstruct obs/lsq and a block refit, off otherwise)",
        "layer-wise",
    )
    true_sequential: bool = setting(
        False,
        "layer-wise mode: inside each block, prune its targets in stages of modules sharing one input "
        "(q/k/v, o, gate/up, down), each stage calibrated after the stages before it are pruned",
        "layer-wise",
    )
    blocksize: int | None = setting(
        None, "columns per block of OBS updates, a multiple of M for N:M (default 128)", "layer-wise",
        range=">= 1",
    )  # fmt: skip
    percdamp: float | None = setting(
        None,
        "Hessian damping as a fraction of its mean diagonal (default 0.01)",
        "layer-wise",
        range="(0, 10]",
    )
    offload_inputs: bool | None = setting(
        None, "keep the recorded block inputs on CPU (default false)", "layer-wise"
    )
    block_steps: int = setting(
        0,
        "block refit: after a block's masks are chosen (by any criterion and update rule), train its kept target "
        "weights jointly for this many full passes over the recorded inputs (Adam) to reproduce the dense "
        "block's outputs on those inputs; every pruned weight stays exactly 0 (0 = off; turns on layer-wise mode)",
        "layer-wise",
        range=">= 0",
    )
    block_lr: float = setting(
        1e-4, "learning rate of the block refit (Adam)", "layer-wise", range="> 0",
        unless=(lambda p: p.block_steps > 0, "applies with block_steps > 0 only"),
    )  # fmt: skip
    block_loss: str = setting(
        "mse",
        "loss of the block refit: mse (mean squared error of the block's outputs) or normalized (each token's "
        "squared error over its dense output's squared norm)",
        "layer-wise",
        choices=("mse", "normalized"),
        unless=(lambda p: p.block_steps > 0, "applies with block_steps > 0 only"),
    )
    block_batch: int = setting(
        0,
        "block refit: an Adam step after every this many recorded micro-batches (0 = one step per pass over "
        "all of them); each pass then makes ceil(micro-batches / block_batch) updates for the same work",
        "layer-wise",
        range=">= 0",
        unless=(lambda p: p.block_steps > 0, "applies with block_steps > 0 only"),
    )
    block_target: str = setting(
        "dense",
        "what the block refit reproduces: dense (the dense model's own outputs of the block, so the refit "
        "also corrects the error the blocks before it left; keeps a second copy of the recorded hidden "
        "states; measured better in and out of domain at 50% and 2:4) or pruned (the dense block's outputs "
        "on the inputs the pruned blocks before it give)",
        "layer-wise",
        choices=("dense", "pruned"),
        unless=(lambda p: p.block_steps > 0, "applies with block_steps > 0 only"),
    )

    block_mask: str = setting(
        "fixed",
        "block refit: fixed (the chosen masks stay) or dynamic (every weight, pruned ones from their dense "
        "values, is trained straight through, and between passes each row, or N:M group, keeps as many "
        "weights as before, those of the largest |w| rms(x_j); the sparsity stays exact and N:M valid)",
        "layer-wise",
        choices=("fixed", "dynamic"),
        unless=(lambda p: p.block_steps > 0, "applies with block_steps > 0 only"),
    )

    def __post_init__(self) -> None:
        validate(self)
        # set away from their declared defaults, before any is resolved: a structured run refuses them all,
        # sparsity 0.5 too (the value its default resolves to)
        self.given = frozenset(
            d.field.name for d in declared(PruneConfig) if getattr(self, d.field.name) != default_of(d.field)
        )
        self._check_finite_params()
        self.notes: list[str] = []  # defaults another setting replaced, said in the report
        crit = CRITERIA.get(self.criterion)
        self.nm = parse_pattern(self.pattern)
        self._resolve_sparsity()
        self.criterion_params = crit.resolve_params(self.criterion_params)
        self._check_scope(crit)
        alloc = ALLOCATIONS.get(self.allocation)
        self.allocation_params = alloc.resolve_params(self.allocation_params, self.sparsity)
        if alloc.needs and (self.nm is not None or self.scope == "global"):
            what = (
                f"pattern {self.pattern!r} fixes every layer's sparsity"
                if self.nm
                else "scope 'global' shares one"
            )
            raise ConfigError(f"allocation {self.allocation!r} sets one sparsity per layer: {what}")
        if self.reconstruct is None:
            self.reconstruct = "obs" if crit.adaptive else "none"
        self._check_gradient_settings(crit)
        self._check_layer_wise()
        if self.rounds > 1 and self.allocation != "uniform":
            raise ConfigError(
                f"rounds {self.rounds} with allocation {self.allocation!r}: each round would allocate anew and could "
                "give a layer fewer zeros than an earlier round left it (use allocation uniform)"
            )
        if self.rounds > 1 and crit.adaptive and self.nm is not None:
            raise ConfigError(
                f"rounds {self.rounds} towards pattern {self.pattern} need a scoring criterion: {crit.name!r} chooses "
                "its own mask and could not keep the earlier rounds' zeros inside the pattern"
            )
        if self.rounds > 1 and self.block_mask == "dynamic":
            raise ConfigError(
                f"rounds {self.rounds} with block_mask dynamic: a later round's refit could bring back weights an "
                "earlier round pruned, and rounds only add zeros (use block_mask fixed, or one round)"
            )

    def _check_finite_params(self) -> None:
        """A parameter of inf or nan passes a lower bound (or fails every comparison): refused here."""
        for kind in ("criterion", "allocation"):
            for name, value in getattr(self, f"{kind}_params").items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(
                        f"{kind} {getattr(self, kind)!r} parameter {name} {value!r} must be a finite number"
                    )

    def _resolve_sparsity(self) -> None:
        """An N:M pattern fixes the sparsity at (M-N)/M: the default follows it, another value is refused."""
        fixed = None if self.nm is None else 1.0 - self.nm[0] / self.nm[1]
        if self.sparsity is None:
            self.sparsity = 0.5 if fixed is None else fixed
            if fixed is not None:
                self.notes.append(f"sparsity set to {self.sparsity:g} by pattern {self.pattern}")
        if fixed is not None and abs(self.sparsity - fixed) > 1e-9:
            raise ConfigError(
                f"sparsity {self.sparsity:g} conflicts with pattern {self.pattern}, which fixes it at {fixed:g}: "
                "drop sparsity"
            )

    def _check_scope(self, crit) -> None:
        if self.scope is not None:
            if self.nm is not None:
                raise ConfigError(
                    f"scope {self.scope!r} conflicts with pattern {self.pattern}: N:M keeps N of every M weights "
                    "of each row whatever the scope (drop scope)"
                )
            if crit.adaptive:
                raise ConfigError(
                    f"scope {self.scope!r} does not apply to criterion {crit.name!r}, which prunes an exact share "
                    "of every column block of each layer (drop scope)"
                )
        elif self.nm is None and not crit.adaptive:
            self.scope = "row"

    def _check_gradient_settings(self, crit) -> None:
        """Settings of the gradient pass are refused where no gradient is taken, never ignored."""
        reads = crit.statistics(self.criterion_params) | set(ALLOCATIONS.get(self.allocation).needs)
        backward = any(STATISTICS.get(s).backward for s in reads)
        grads = any(STATISTICS.get(s).source == "grad" for s in reads)
        what = f"criterion {self.criterion!r}" + (
            f" with allocation {self.allocation!r}" if self.allocation != "uniform" else ""
        )
        if self.grad_accum > 1 and not grads:
            raise ConfigError(
                f"grad_accum {self.grad_accum} averages gradients, but {what} reads no gradient statistics"
            )
        if self.stats_device != "same" and not backward:
            raise ConfigError(
                f"stats_device {self.stats_device!r} places gradient statistics, but {what} reads none"
            )
        if self.gradient_checkpointing and not backward:
            raise ConfigError(
                f"gradient_checkpointing recomputes activations in backward, but {what} runs no backward pass"
            )

    def _check_layer_wise(self) -> None:
        if self.true_sequential and (self.sequential is False or not self.layer_wise):
            raise ConfigError(
                "true_sequential needs sequential layer-wise mode (criterion sparsegpt, reconstruct "
                f"obs/lsq, or sequential: true), not sequential: {self.sequential} with reconstruct {self.reconstruct!r}"
            )
        if not self.layer_wise:
            for name in ("blocksize", "percdamp", "offload_inputs"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{name} {getattr(self, name)!r} applies to layer-wise mode only (criterion sparsegpt, "
                        "reconstruct obs/lsq, or sequential: true)"
                    )
            return
        self.blocksize = 128 if self.blocksize is None else self.blocksize
        self.percdamp = 0.01 if self.percdamp is None else self.percdamp
        self.offload_inputs = False if self.offload_inputs is None else self.offload_inputs
        if self.nm is not None and self.blocksize % self.nm[1]:
            raise ConfigError(
                f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]} of pattern {self.pattern}"
            )

    @property
    def layer_wise(self) -> bool:
        """Whether pruning runs block by block: an adaptive criterion, an update rule, sequential asked, or a
        block refit."""
        crit = CRITERIA.get(self.criterion)
        return (crit.adaptive or crit.block_local or self.reconstruct != "none" or bool(self.sequential)
                or self.block_steps > 0)  # fmt: skip

    @property
    def sequential_inputs(self) -> bool:
        """Whether a layer-wise pass feeds each block the outputs of the already-pruned blocks before it:
        `sequential` when set; by default whenever weights are updated (an adaptive criterion, reconstruct
        obs/lsq, a block refit; `true_sequential`), since the updates then make up for the errors before
        them. A mask-only block-local criterion reads the dense model's block inputs: its masks were
        better on them (docs/BENCHMARKS.md, issue 26)."""
        if self.sequential is not None:
            return self.sequential
        crit = CRITERIA.get(self.criterion)
        return self.layer_wise and (crit.adaptive or self.reconstruct != "none" or self.block_steps > 0
                                    or self.true_sequential)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


OFFLOADS = ("none", "cpu", "disk")


@dataclass
class JobConfig:
    """The job around pruning: model, text, evaluation, output, devices and resume. Holds `prune`."""

    # -- model and data ------------------------------------------------------------------------
    model: str = setting(
        "builtin:smollm2-135m", "Hub id, local folder, or builtin:smollm2-135m", "model and data"
    )
    dataset: str = setting(
        "builtin:imdb", "builtin:imdb, a Hub data set id (streamed), or a .txt/.jsonl/.csv/.parquet file",
        "model and data", commands=FLAG_COMMANDS,
    )  # fmt: skip
    dataset_config: str | None = setting(
        None, "Hub data set configuration name, if it has several", "model and data", commands=FLAG_COMMANDS
    )
    split: str = setting(
        "train",
        "split read for calibration (builtin/local files: train = calibration part)",
        "model and data",
        commands=PRUNE_RECOVER,
    )
    text_column: str = setting(
        "text", "column holding the text in tabular sources", "model and data", commands=FLAG_COMMANDS
    )
    num_samples: int = setting(
        64, "calibration samples (token sequences) of seq_len tokens", "model and data", range=">= 0"
    )
    seq_len: int = setting(
        512,
        "tokens per calibration sample (never defaults to the model's context)",
        "model and data",
        range=">= 1",
    )
    batch_size: int = setting(
        1, "samples per micro-batch; one gradient = one micro-batch", "model and data", range=">= 1"
    )
    seed: int = setting(
        0, "seed of the calibration block order", "model and data", range=">= 0", commands=PRUNE_EVAL
    )
    dtype: str = setting("float32", "model weights dtype; statistics are always fp32", "model and data",
                         choices=DTYPES, commands=FLAG_COMMANDS)  # fmt: skip
    trust_remote_code: bool = setting(
        False, "allow model code from the Hub (off unless asked)", "model and data", commands=FLAG_COMMANDS
    )
    offload: str = setting(
        "none",
        "where the weights live in a layer-wise run: none (all on the device), cpu (in host memory; one block "
        "at a time on the device) or disk (read block by block from the safetensors files, each pruned block "
        "written to the output as soon as it is done; one block in memory)",
        "model and data",
        choices=OFFLOADS,
        commands=("prune",),
    )
    # -- evaluation: none of it changes the pruned weights --------------------------------------
    eval: bool = setting(
        False, "evaluate dense and pruned perplexity on the same held-out windows", "evaluation",
        commands=PRUNE_RECOVER, run_control=True,
    )  # fmt: skip
    eval_split: str = setting(
        "test", "split read for evaluation (builtin/local files: test = held-out part)", "evaluation",
        commands=FLAG_COMMANDS, run_control=True,
    )  # fmt: skip
    eval_num_samples: int = setting(64, "evaluation windows of eval_seq_len tokens", "evaluation", range=">= 1",
                                    commands=FLAG_COMMANDS, run_control=True)  # fmt: skip
    eval_seq_len: int | None = setting(None, "tokens per evaluation window (default: seq_len)", "evaluation",
                                       range=">= 1", commands=FLAG_COMMANDS, run_control=True)  # fmt: skip
    eval_batch_size: int = setting(4, "evaluation windows per forward pass", "evaluation", range=">= 1",
                                   commands=FLAG_COMMANDS, run_control=True)  # fmt: skip
    eval_stride: int | None = setting(
        None, "score only the last eval_stride tokens of overlapping windows (more context)", "evaluation",
        range=">= 1", commands=FLAG_COMMANDS, run_control=True,
    )  # fmt: skip
    eval_tasks: list[str] = setting(
        [], "lm-evaluation-harness tasks to score before and after pruning, e.g. boolq,arc_easy (lmeval extra)",
        "evaluation", commands=PRUNE_EVAL, run_control=True,
    )  # fmt: skip
    eval_tasks_include_path: str | None = setting(
        None, "a folder of lm-eval task YAML files (offline tasks)", "evaluation", commands=PRUNE_EVAL,
        run_control=True,
    )  # fmt: skip
    eval_tasks_limit: int | None = setting(
        None, "score only the first N examples of each task (a quick look)", "evaluation", range=">= 1",
        commands=PRUNE_EVAL, run_control=True,
    )  # fmt: skip
    eval_tasks_fewshot: int | None = setting(
        None, "few-shot examples per task (default: each task's own)", "evaluation", range=">= 0",
        commands=PRUNE_EVAL, run_control=True,
    )  # fmt: skip
    # -- output: where and how the result is written, not what it is ---------------------------
    output_dir: str = setting("out/pruned", "where the pruned checkpoint and report are written", "output",
                              commands=PRUNE_RECOVER, run_control=True)  # fmt: skip
    overwrite: bool = setting(False, "replace a non-empty output directory", "output", commands=PRUNE_RECOVER,
                              run_control=True)  # fmt: skip
    max_shard_size: str = setting("5GB", "largest safetensors shard written (e.g. 500MB, 5GB)", "output",
                                  commands=PRUNE_RECOVER, run_control=True)  # fmt: skip
    push_to_hub: str | None = setting(
        None, "push the verified checkpoint to this Hub repo (user/name)", "output", run_control=True
    )
    push_private: bool = setting(False, "with push_to_hub: create the repo private", "output", run_control=True,
                                 unless=(lambda j: bool(j.push_to_hub), "applies only with push_to_hub"))  # fmt: skip
    push_revision: str | None = setting(
        None, "with push_to_hub: the branch to push to (created if missing)", "output", run_control=True,
        unless=(lambda j: bool(j.push_to_hub), "applies only with push_to_hub"),
    )  # fmt: skip
    # -- devices and processes -----------------------------------------------------------------
    device: str | None = setting(
        None, "force a device (cpu, cuda, cuda:1); default: Accelerate's choice", "distributed",
        commands=FLAG_COMMANDS, run_control=True,
    )  # fmt: skip
    fsdp: bool = setting(
        False,
        "with several processes, shard the weights by rows (torch FSDP2) instead of replicating them; "
        "implied by an accelerate config with distributed_type FSDP",
        "distributed",
    )
    # -- resume --------------------------------------------------------------------------------
    save_state_every: int = setting(
        0, "save the calibration state every N calibration batches (0 = never) for --resume", "resume",
        range=">= 0", run_control=True,
    )  # fmt: skip
    resume: bool = setting(
        False, "continue calibration (prune) or training (recover) from the last saved state", "resume",
        commands=PRUNE_RECOVER, run_control=True,
    )  # fmt: skip
    state_dir: str | None = setting(
        None, "folder of the saved calibration state (default: <output_dir>.calib-state)", "resume",
        run_control=True,
    )  # fmt: skip
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    structured: StructureConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prune, dict):
            self.prune = PruneConfig(**self.prune)
        if isinstance(self.recover, dict):
            self.recover = RecoverConfig(**self.recover)
        elif self.recover is None:
            self.recover = RecoverConfig()
        if isinstance(self.structured, dict):
            self.structured = StructureConfig(**self.structured)
        validate(self)
        if self.structured is not None:
            self._check_structured()
        tasks = [t.strip() for item in self.eval_tasks for t in str(item).split(",") if t.strip()]
        if self.eval_tasks and not tasks:  # `--tasks ''` would silently score perplexity instead
            raise ConfigError(
                f"eval_tasks {self.eval_tasks!r} names no task: give names such as boolq,arc_easy"
            )
        self.eval_tasks = tasks
        self._check_recovery_eval()
        self._check_offload()
        self.max_shard_bytes = parse_size(self.max_shard_size)
        p = self.prune
        crit, alloc = CRITERIA.get(p.criterion), ALLOCATIONS.get(p.allocation)
        if self.num_samples == 0 and (crit.needs_calibration or p.layer_wise):
            raise ConfigError(f"criterion {p.criterion!r} needs calibration data but num_samples is 0")
        if self.num_samples == 0 and alloc.needs:
            raise ConfigError(f"allocation {p.allocation!r} needs activation statistics but num_samples is 0")
        if self.num_samples and self.num_samples < self.batch_size:
            raise ConfigError(f"batch_size {self.batch_size} is larger than num_samples {self.num_samples}")
        if self.eval_stride is not None and self.eval_stride > (self.eval_seq_len or self.seq_len):
            raise ConfigError(
                f"eval_stride {self.eval_stride} is larger than eval_seq_len {self.eval_seq_len or self.seq_len}"
            )

    def _check_offload(self) -> None:
        if self.offload == "none":
            return
        if self.structured is None and not self.prune.layer_wise:
            raise ConfigError(
                f"offload {self.offload!r} applies to layer-wise runs (criterion sparsegpt, reconstruct obs/lsq, "
                f"or sequential: true), not to criterion {self.prune.criterion!r} with the whole model at once"
            )
        if self.fsdp and self.structured is None:
            return  # the support table's path "layer-wise after FSDP2 statistics" says what it refuses
        whole_model = {"eval": "eval scores perplexity", "eval_tasks": "eval_tasks score tasks",
                       "resume": "resume continues a calibration of",
                       "save_state_every": "save_state_every saves a calibration of"}  # fmt: skip
        for key, what in whole_model.items():
            if getattr(self, key):
                raise ConfigError(
                    f"{key} with offload {self.offload!r} is not supported: {what} the whole model at once; "
                    f"run it on the output afterwards, or drop --offload"
                )
        if self.recover.steps or self.prune.rounds > 1:
            what = "recover_steps trains" if self.recover.steps else "rounds retrain and recalibrate"
            raise ConfigError(
                f"{what} the whole model at once, which offload {self.offload!r} does not hold: recover the output "
                "with llm-gradprune recover afterwards, or drop --offload"
            )

    def _check_recovery_eval(self) -> None:
        """Evaluation during recovery runs on the held-out windows of `eval`: without it, it would not run."""
        r, rec = self.recover, RecoverConfig
        for name in ("eval_every", "eval_windows"):
            value = getattr(r, name)
            if not self.eval and value != rec.__dataclass_fields__[name].default:
                raise ConfigError(
                    f"{flat_key(rec, name)} {value!r} scores held-out perplexity during recovery, which runs only "
                    "with eval: pass --eval (or drop it)"
                )

    def _check_structured(self) -> None:
        """A structured run removes units instead of zeroing weights: unstructured settings are refused."""
        s = self.structured
        for d in declared(PruneConfig):
            if d.field.name in self.prune.given and not d.spec.structured:
                raise ConfigError(
                    f"{d.key} {getattr(self.prune, d.field.name)!r} applies to unstructured pruning, but structure "
                    f"{s.structure!r} removes whole units (importance, target_params and keep_* choose them): drop "
                    "one or the other"
                )
        if self.fsdp:
            raise ConfigError("structure with fsdp is not supported: structured pruning runs in one process")
        if self.save_state_every or self.resume:
            raise ConfigError(
                "save_state_every / resume apply to the unstructured calibration only, not to structure"
            )
        if self.num_samples == 0 and self.structure_needs_data:
            raise ConfigError(
                f"structure with importance {s.importance!r} (compensate {s.compensate!r}) needs calibration "
                "data but num_samples is 0"
            )

    @property
    def structure_needs_data(self) -> bool:
        s = self.structured
        imp = IMPORTANCES.get(s.importance)
        return bool(
            imp.weight_needs(s.importance_form) or imp.unit_needs(s.importance_form)
            or s.mean_bias or (s.compensate != "none" and set(s.kinds) & {"channels", "heads"})
        )  # fmt: skip

    @property
    def needs_data(self) -> bool:
        if self.structured is not None:
            return self.structure_needs_data
        p = self.prune
        return bool(
            CRITERIA.get(p.criterion).needs_calibration or p.layer_wise or ALLOCATIONS.get(p.allocation).needs
        )

    # -- flat YAML and flags -------------------------------------------------------------------
    def _holder(self, cls: type) -> Any:
        return {JobConfig: self, PruneConfig: self.prune, StructureConfig: self.structured,
                RecoverConfig: self.recover}[cls]  # fmt: skip

    def to_flat(self) -> dict[str, Any]:
        """Every setting under its flat key: what prune_config.yaml holds and `from_flat` reads back.

        A structured run leaves out the unstructured method's settings (they would mislead), an
        unstructured one the structure's."""
        out = {}
        for cls, d in flat_settings():
            holder = self._holder(cls)
            if holder is None or (
                cls is PruneConfig and self.structured is not None and not d.spec.structured
            ):
                continue
            out[d.key] = getattr(holder, d.field.name)
        return out

    def identity(self, with_recovery: bool = False) -> dict[str, Any]:
        """The flat settings a saved state depends on, JSON-normalised: all but run control; the recovery
        training settings only `with_recovery` (a calibration state does not depend on them)."""
        skip = {
            d.key
            for cls, d in flat_settings()
            if d.spec.run_control or (cls is RecoverConfig and not with_recovery)
        }
        values = {k: v for k, v in self.to_flat().items() if k not in skip}
        return json.loads(json.dumps(values, sort_keys=True, default=str))

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_flat(), sort_keys=False))

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> JobConfig:
        """A job from flat keys (`criterion`, `recover_lr`, `gblm_alpha`, ...); a legacy `recover:` section
        is read as its `recover_<name>` keys."""
        values = unnest_recover(values)
        keys = {d.key: (owner, d.field.name) for owner, d in flat_settings()}
        aliases = param_aliases()
        given: dict[type, dict[str, Any]] = {
            JobConfig: {},
            PruneConfig: {},
            StructureConfig: {},
            RecoverConfig: {},
        }
        for key, value in values.items():
            if key in keys:
                owner, name = keys[key]
                given[owner][name] = value
            elif key not in aliases:
                near = difflib.get_close_matches(key, [*keys, *aliases], n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
        prune, structure = given[PruneConfig], given[StructureConfig]
        for key, (kind, owner, param) in aliases.items():
            if key not in values:
                continue
            chosen = prune.get(kind, PruneConfig.__dataclass_fields__[kind].default)
            if owner != chosen:
                raise ConfigError(f"{key} applies to {kind} {owner!r}, but the {kind} is {chosen!r}")
            bucket = f"{kind}_params"
            prune[bucket] = {**prune.get(bucket, {}), param: values[key]}
        if structure and structure.get("structure") is None:
            key = next(iter(structure))
            raise ConfigError(
                f"{key} applies to structured pruning only: give structure ({', '.join(STRUCTURES)}) with it"
            )
        return cls(**given[JobConfig], prune=PruneConfig(**prune), recover=RecoverConfig(**given[RecoverConfig]),
                   structured=StructureConfig(**structure) if structure else None)  # fmt: skip

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> JobConfig:
        return cls.from_flat({**read_yaml(path), **overrides})


@functools.cache
def flat_settings() -> tuple[tuple[type, Declared], ...]:
    """(config class, setting) of every setting of a job, by flat key: the YAML keys and the flags."""
    return tuple(
        (cls, d) for cls in (JobConfig, StructureConfig, PruneConfig, RecoverConfig) for d in declared(cls)
    )


def unnest_recover(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with a `recover:` section (prune_config.yaml before recovery keys were flat) replaced by its
    `recover_<name>` keys, so an old file repeats its run; a setting given both ways is refused."""
    if "recover" not in values:
        return values
    section = values["recover"]
    if not isinstance(section, dict):
        raise ConfigError(f"recover {section!r} must be a section of recovery settings (steps, lr, ...)")
    names = [f.name for f in dataclasses.fields(RecoverConfig)]
    out = {k: v for k, v in values.items() if k != "recover"}
    for name, value in section.items():
        if name not in names:
            near = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown recover key {name!r}{hint}")
        key = flat_key(RecoverConfig, name)
        if key in out:
            raise ConfigError(f"{key} is given twice, as {key} and in the recover section: give it once")
        out[key] = value
    return out


def param_aliases() -> dict[str, tuple[str, str, str]]:
    """Flat keys of registered parameters: `gblm_alpha` -> ("criterion", "gblm", "alpha"), `owl_lambda` -> ..."""
    out = {}
    for kind, registry in (("criterion", CRITERIA), ("allocation", ALLOCATIONS)):
        for name, entry in registry.items():
            for param in entry.params:
                out[f"{name}_{param}"] = (kind, name, param)
    return out


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load`, but a key given twice in one mapping is refused (PyYAML keeps the last one
    silently), and `1e-4` is a float as in YAML 1.2 (YAML 1.1 wants a dot and reads it as a string)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {first[key] + 1}): give it once",
                    key_node.start_mark,
                )  # fmt: skip
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text as every config value is read: `1e-4` a float, no key twice (`yaml.YAMLError` if bad)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _config_text(path: str | Path) -> str:
    """The text of a config file, or one line on why it cannot be read."""
    p = Path(path)
    problem = unreachable_path(p) or ("is a folder, not a YAML file" if p.is_dir() else None)
    if problem is None:
        try:
            data = p.read_bytes()
        except OSError as err:
            problem = f"cannot be read: {err.strerror}"
    if problem is not None:
        raise ConfigError(f"config file {str(path)!r} {problem}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}"
        ) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The flat keys of a config file (a legacy `recover:` section unnested, so flags can override it)."""
    text = _config_text(path)
    try:
        values = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None
    if values is None:  # no key at all: running every default (a 135M job) is never what was meant
        raise ConfigError(f"config file {str(path)!r} is empty: it holds no settings")
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return unnest_recover(values)
