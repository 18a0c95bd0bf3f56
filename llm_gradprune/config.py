"""The settings of a run, as dataclasses: what pruning needs apart from the job around it.

- `PruneConfig`: what `prune_` needs: the method (criterion and its parameters, sparsity, scope,
  pattern, allocation, update rule, targets), calibration settings and layer-wise settings.
- `JobConfig`: the job around it: model, text, evaluation, output folder, devices, resume; it holds
  one `PruneConfig` as `prune`.

YAML files and CLI flags stay flat (`criterion: fisher`, `--num-samples 64`): `JobConfig.from_flat`
sorts every key into its dataclass, and a criterion's or allocation's parameters may be given as
`<name>_<param>` (`gblm_alpha: 100`, `--owl-lambda 0.1`) as well as in `criterion_params`. The CLI
builds one flag per field from these same definitions (`commands/flags.py`), so a key and its flag
never drift apart. Validation happens once, in `__post_init__`, and raises `ConfigError` with a
one-line message naming the bad value; a setting that another one fixes is refused when it conflicts
and reported in `notes` when its default was replaced.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .calibration.stats import STATISTICS
from .errors import ConfigError
from .fields import _f
from .reconstruction.rules import UPDATES
from .recovery.config import RecoverConfig
from .scoring.allocation import ALLOCATIONS
from .scoring.criteria import CRITERIA
from .selection.masks import SCOPES
from .structured.config import STRUCTURES, StructureConfig
from .structured.importance import IMPORTANCES

NESTED = ("prune", "recover", "structured")  # JobConfig fields that hold a config of their own
# PruneConfig settings a structured run uses too; every other one is refused alongside `structure`
STRUCTURED_PRUNE_KEYS = ("threads", "progress")
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


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} {value!r} must be an integer >= {low}")


def _check_bool(name: str, value: Any, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ConfigError(f"{name} {value!r} must be true or false")


@dataclass
class PruneConfig:
    """What `prune_` needs: method, calibration and layer-wise settings (no paths of the job)."""

    # -- method --------------------------------------------------------------------------------
    criterion: str = _f("token_fisher", "importance score", "method", choices=CRITERIA.names)
    criterion_params: dict = _f({}, "parameters of the criterion (or flags --<criterion>-<param>)", "method")
    sparsity: float | None = _f(
        None,
        "fraction of target weights set to zero, in [0, 1) (default 0.5; N:M fixes it at (M-N)/M)",
        "method",
    )
    scope: str | None = _f(
        None,
        "weights that compete for one budget (default row; N:M patterns and sparsegpt choose their own)",
        "method",
        choices=SCOPES.names,
    )
    pattern: str = _f(
        "unstructured", "unstructured, or N:M such as 2:4 (keep N of every M input weights)", "method"
    )
    allocation: str = _f("uniform", "sparsity per decoder layer", "method", choices=ALLOCATIONS.names)
    allocation_params: dict = _f(
        {}, "parameters of the allocation (or flags --<allocation>-<param>)", "method"
    )
    reconstruct: str | None = _f(
        None, "update of the kept weights once the mask is fixed (default: obs for sparsegpt, else none)", "method",
        choices=UPDATES.names,
    )  # fmt: skip
    rounds: int = _f(1, "prune in this many rounds towards the target, recalibrating on the pruned model each time",
                     "method")  # fmt: skip
    round_schedule: str = _f(
        "cubic", "sparsity after round r of K: cubic s(1-(1-r/K)^3) (Zhu & Gupta, 2017) or linear s r/K", "method",
        choices=lambda: ROUND_SCHEDULES,
    )  # fmt: skip
    include: list[str] = _f([], "regexes over module names; a target must match one (empty = all)", "method")
    exclude: list[str] = _f([], "regexes over module names; a match is never pruned", "method")
    allow_empty_tensors: bool = _f(
        False, "allow a selection that zeroes a whole target tensor (refused by default)", "method"
    )
    # -- calibration ---------------------------------------------------------------------------
    grad_accum: int = _f(
        1,
        "micro-batches summed into one gradient sample (sample = mean gradient of grad_accum x batch_size "
        "blocks); > 1 costs one fp32 buffer per target weight",
        "calibration",
    )
    stats_device: str = _f(
        "same",
        "where gradient statistics live: same (as each weight) or cpu (pinned, non-blocking copies "
        "from a GPU; the GPU then holds model + activations only)",
        "calibration",
        choices=lambda: STATS_DEVICES,
    )
    gradient_checkpointing: bool = _f(
        False,
        "recompute layer activations in backward (transformers' own): less memory, ~1.3x time",
        "calibration",
    )
    select_chunk_elems: int = _f(
        1 << 24,
        "scores looked at per chunk in exact selection, and elements per cross-process sum (bounds memory)",
        "calibration",
    )
    scores_dir: str | None = _f(
        None,
        "global scope: hold scores on disk in a temporary folder under this one (RAM = one chunk); "
        "default: recompute them in memory",
        "calibration",
    )
    threads: int | None = _f(
        None,
        "CPU threads for calibration and layer-wise pruning (default: every core this process may use, "
        "shared among the processes of this machine)",
        "calibration",
    )
    progress: bool = _f(True, "show progress bars", "output")
    # -- layer-wise ----------------------------------------------------------------------------
    sequential: bool | None = _f(
        None,
        "layer-wise mode, each block calibrated on the outputs of the already-pruned blocks before it "
        "(default: on for sparsegpt and reconstruct obs/lsq, off otherwise)",
        "layer-wise",
    )
    true_sequential: bool = _f(
        False,
        "layer-wise mode: inside each block, prune its targets in stages of modules sharing one input "
        "(q/k/v, o, gate/up, down), each stage calibrated after the stages before it are pruned",
        "layer-wise",
    )
    blocksize: int | None = _f(
        None, "columns per block of OBS updates, a multiple of M for N:M (default 128)", "layer-wise"
    )
    percdamp: float | None = _f(
        None, "Hessian damping as a fraction of its mean diagonal (default 0.01)", "layer-wise"
    )
    offload_inputs: bool | None = _f(
        None, "keep the recorded block inputs on CPU (default false)", "layer-wise"
    )

    def __post_init__(self) -> None:
        self.notes: list[str] = []  # defaults another setting replaced, said in the report
        crit = CRITERIA.get(self.criterion)
        self.nm = parse_pattern(self.pattern)
        if self.sparsity is None:
            self.sparsity = 0.5 if self.nm is None else 1.0 - self.nm[0] / self.nm[1]
            if self.nm is not None:
                self.notes.append(f"sparsity set to {self.sparsity:g} by pattern {self.pattern}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float):
            raise ConfigError(f"sparsity {self.sparsity!r} must be a number in [0, 1)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity {self.sparsity!r} is outside [0, 1)")
        self.sparsity = float(self.sparsity)
        if self.nm is not None and abs(self.sparsity - (1.0 - self.nm[0] / self.nm[1])) > 1e-9:
            fixed = 1.0 - self.nm[0] / self.nm[1]
            raise ConfigError(
                f"sparsity {self.sparsity:g} conflicts with pattern {self.pattern}, which fixes it at {fixed:g}: "
                "drop sparsity"
            )
        if not isinstance(self.criterion_params, dict):
            raise ConfigError(
                f"criterion_params {self.criterion_params!r} must map parameter names to values"
            )
        self.criterion_params = crit.resolve_params(self.criterion_params)
        self._check_scope(crit)
        alloc = ALLOCATIONS.get(self.allocation)
        if not isinstance(self.allocation_params, dict):
            raise ConfigError(
                f"allocation_params {self.allocation_params!r} must map parameter names to values"
            )
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
        UPDATES.get(self.reconstruct)
        if self.stats_device not in STATS_DEVICES:
            raise ConfigError(
                f"stats_device {self.stats_device!r} is unknown: choose one of {', '.join(STATS_DEVICES)}"
            )
        _check_int("grad_accum", self.grad_accum, 1)
        _check_int("select_chunk_elems", self.select_chunk_elems, 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        for name in ("gradient_checkpointing", "progress", "allow_empty_tensors", "true_sequential"):
            _check_bool(name, getattr(self, name))
        _check_bool("sequential", self.sequential, optional=True)
        if self.scores_dir is not None and (self.scope != "global" or self.nm is not None):
            raise ConfigError(f"scores_dir {self.scores_dir!r} is used only by the unstructured global scope")
        for name in ("include", "exclude"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        self._check_gradient_settings(crit)
        self._check_layer_wise()
        _check_int("rounds", self.rounds, 1)
        if self.round_schedule not in ROUND_SCHEDULES:
            raise ConfigError(
                f"round_schedule {self.round_schedule!r} is unknown: choose one of {', '.join(ROUND_SCHEDULES)}"
            )
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

    def _check_scope(self, crit) -> None:
        if self.scope is not None:
            SCOPES.get(self.scope)
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
                f"grad_accum {self.grad_accum} averages gradient samples, but {what} reads no gradient statistics"
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
        _check_bool("offload_inputs", self.offload_inputs)
        _check_int("blocksize", self.blocksize, 1)
        if self.layer_wise and self.nm is not None and self.blocksize % self.nm[1]:
            raise ConfigError(
                f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]} of pattern {self.pattern}"
            )
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, int | float):
            raise ConfigError(f"percdamp {self.percdamp!r} must be in (0, 10]")
        if not 0.0 < float(self.percdamp) <= 10.0:
            raise ConfigError(f"percdamp {self.percdamp!r} must be in (0, 10]")
        self.percdamp = float(self.percdamp)

    @property
    def layer_wise(self) -> bool:
        """Whether pruning runs block by block: an adaptive criterion, an update rule, or sequential asked."""
        return CRITERIA.get(self.criterion).adaptive or self.reconstruct != "none" or bool(self.sequential)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class JobConfig:
    """The job around pruning: model, text, evaluation, output, devices and resume. Holds `prune`."""

    # -- model and data ------------------------------------------------------------------------
    model: str = _f("builtin:smollm2-135m", "Hub id, local folder, or builtin:smollm2-135m", "model and data")
    dataset: str = _f(
        "builtin:imdb", "builtin:imdb, a Hub data set id (streamed), or a .txt/.jsonl/.csv/.parquet file",
        "model and data",
    )  # fmt: skip
    dataset_config: str | None = _f(
        None, "Hub data set configuration name, if it has several", "model and data"
    )
    split: str = _f(
        "train",
        "split read for calibration (builtin/local files: train = calibration part)",
        "model and data",
    )
    text_column: str = _f("text", "column holding the text in tabular sources", "model and data")
    num_samples: int = _f(64, "calibration blocks of seq_len tokens", "model and data")
    seq_len: int = _f(
        512, "tokens per calibration block (never defaults to the model's context)", "model and data"
    )
    batch_size: int = _f(1, "blocks per micro-batch; one gradient sample = one micro-batch", "model and data")
    seed: int = _f(0, "seed of the calibration block order", "model and data")
    dtype: str = _f("float32", "model weights dtype; statistics are always fp32", "model and data",
                    choices=lambda: DTYPES)  # fmt: skip
    trust_remote_code: bool = _f(False, "allow model code from the Hub (off unless asked)", "model and data")
    # -- evaluation ----------------------------------------------------------------------------
    eval: bool = _f(False, "evaluate dense and pruned perplexity on the same held-out windows", "evaluation")
    eval_split: str = _f(
        "test", "split read for evaluation (builtin/local files: test = held-out part)", "evaluation"
    )
    eval_num_samples: int = _f(64, "evaluation windows of eval_seq_len tokens", "evaluation")
    eval_seq_len: int | None = _f(None, "tokens per evaluation window (default: seq_len)", "evaluation")
    eval_batch_size: int = _f(4, "evaluation windows per forward pass", "evaluation")
    eval_stride: int | None = _f(
        None, "score only the last eval_stride tokens of overlapping windows (more context)", "evaluation"
    )
    eval_tasks: list[str] = _f(
        [], "lm-evaluation-harness tasks to score before and after pruning, e.g. boolq,arc_easy (lmeval extra)",
        "evaluation",
    )  # fmt: skip
    eval_tasks_include_path: str | None = _f(
        None, "a folder of lm-eval task YAML files (offline tasks)", "evaluation"
    )
    eval_tasks_limit: int | None = _f(
        None, "score only the first N examples of each task (a quick look)", "evaluation"
    )
    eval_tasks_fewshot: int | None = _f(
        None, "few-shot examples per task (default: each task's own)", "evaluation"
    )
    # -- output --------------------------------------------------------------------------------
    output_dir: str = _f("out/pruned", "where the pruned checkpoint and report are written", "output")
    overwrite: bool = _f(False, "replace a non-empty output directory", "output")
    max_shard_size: str = _f("5GB", "largest safetensors shard written (e.g. 500MB, 5GB)", "output")
    push_to_hub: str | None = _f(None, "push the verified checkpoint to this Hub repo (user/name)", "output")
    push_private: bool = _f(False, "with push_to_hub: create the repo private", "output")
    push_revision: str | None = _f(
        None, "with push_to_hub: the branch to push to (created if missing)", "output"
    )
    # -- devices and processes -----------------------------------------------------------------
    device: str | None = _f(
        None, "force a device (cpu, cuda, cuda:1); default: Accelerate's choice", "distributed"
    )
    fsdp: bool = _f(
        False,
        "with several processes, shard the weights by rows (torch FSDP2) instead of replicating them; "
        "implied by an accelerate config with distributed_type FSDP",
        "distributed",
    )
    # -- resume --------------------------------------------------------------------------------
    save_state_every: int = _f(
        0, "save the calibration state every N batches (0 = never) for --resume", "resume"
    )
    resume: bool = _f(
        False, "continue calibration from the last saved state (see save_state_every)", "resume"
    )
    state_dir: str | None = _f(
        None, "folder of the saved calibration state (default: <output_dir>.calib-state)", "resume"
    )
    prune: PruneConfig = field(default_factory=PruneConfig, metadata={"group": None})
    recover: RecoverConfig = field(default_factory=RecoverConfig, metadata={"group": None})
    structured: StructureConfig | None = field(default=None, metadata={"group": None})

    def __post_init__(self) -> None:
        if isinstance(self.prune, dict):
            self.prune = PruneConfig(**self.prune)
        if isinstance(self.recover, dict):
            self.recover = RecoverConfig(**self.recover)
        elif self.recover is None:
            self.recover = RecoverConfig()
        if isinstance(self.structured, dict):
            self.structured = StructureConfig(**self.structured)
        if self.structured is not None:
            self._check_structured()
        if self.eval_tasks_fewshot is not None:
            _check_int("eval_tasks_fewshot", self.eval_tasks_fewshot, 0)
        for name in ("num_samples", "seq_len", "batch_size", "seed", "eval_num_samples", "eval_batch_size",
                     "save_state_every"):  # fmt: skip
            _check_int(
                name, getattr(self, name), 0 if name in ("num_samples", "seed", "save_state_every") else 1
            )
        if isinstance(self.eval_tasks, str):
            self.eval_tasks = [self.eval_tasks]
        self.eval_tasks = [t.strip() for item in self.eval_tasks for t in str(item).split(",") if t.strip()]
        for name in ("eval_seq_len", "eval_stride", "eval_tasks_limit"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("trust_remote_code", "eval", "overwrite", "fsdp", "resume"):
            _check_bool(name, getattr(self, name))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
        self.max_shard_bytes = parse_size(self.max_shard_size)
        if (self.push_private or self.push_revision) and not self.push_to_hub:
            raise ConfigError("push_private / push_revision apply only with push_to_hub")
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

    def _check_structured(self) -> None:
        """A structured run removes units instead of zeroing weights: unstructured settings are refused."""
        s, default = self.structured, PruneConfig(threads=self.prune.threads, progress=self.prune.progress)
        for name, value in self.prune.to_dict().items():
            if name not in STRUCTURED_PRUNE_KEYS and value != getattr(default, name):
                raise ConfigError(
                    f"{name} {value!r} applies to unstructured pruning, but structure {s.structure!r} removes whole "
                    "units (importance, target_params and keep_* choose them): drop one or the other"
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
    def to_flat(self) -> dict[str, Any]:
        """Every setting under its flat key: what prune_config.yaml holds and `from_flat` reads back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NESTED}
        prune = self.prune.to_dict()
        if self.structured is not None:  # the unstructured method does not apply: its keys would mislead
            prune = {k: v for k, v in prune.items() if k in STRUCTURED_PRUNE_KEYS}
            prune = {**self.structured.to_dict(), **prune}
        return {**out, **prune, "recover": self.recover.to_dict()}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_flat(), sort_keys=False))

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> JobConfig:
        job_keys = [f.name for f in dataclasses.fields(cls) if f.name not in NESTED]
        prune_keys = [f.name for f in dataclasses.fields(PruneConfig)]
        recover_keys = {f"recover_{f.name}": f.name for f in dataclasses.fields(RecoverConfig)}
        structure_keys = [f.name for f in dataclasses.fields(StructureConfig)]
        aliases = param_aliases()
        known = job_keys + prune_keys + structure_keys + list(aliases) + list(recover_keys) + ["recover"]
        job, prune, recover, structure = {}, {}, {}, {}
        for key, value in values.items():
            if key in job_keys:
                job[key] = value
            elif key in structure_keys:
                structure[key] = value
            elif key in prune_keys:
                prune[key] = value
            elif key == "recover":
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"recover {value!r} must be a section of recovery settings (steps, lr, ...)"
                    )
                unknown = [k for k in value if f"recover_{k}" not in recover_keys]
                if unknown:
                    near = difflib.get_close_matches(
                        unknown[0], [f.name for f in dataclasses.fields(RecoverConfig)], n=1
                    )
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    raise ConfigError(f"unknown recover key {unknown[0]!r}{hint}")
                recover.update(value)
            elif key in recover_keys:
                recover[recover_keys[key]] = value
            elif key in aliases:
                continue
            else:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
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
        return cls(**job, prune=PruneConfig(**prune), recover=RecoverConfig(**recover),
                   structured=StructureConfig(**structure) if structure else None)  # fmt: skip

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> JobConfig:
        return cls.from_flat({**read_yaml(path), **overrides})


def param_aliases() -> dict[str, tuple[str, str, str]]:
    """Flat keys of registered parameters: `gblm_alpha` -> ("criterion", "gblm", "alpha"), `owl_lambda` -> ..."""
    out = {}
    for kind, registry in (("criterion", CRITERIA), ("allocation", ALLOCATIONS)):
        for name, entry in registry.items():
            for param in entry.params:
                out[f"{name}_{param}"] = (kind, name, param)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return values
