"""Every knob of a pruning run, as one dataclass.

YAML files parse 1:1 into `PruneConfig`; the CLI builds one flag per field from the same
definition, so a key and its flag can never drift apart. Validation happens once, in
`__post_init__`, and raises `ConfigError` with a one-line message naming the bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CRITERIA = (
    "magnitude",
    "gradient",
    "taylor",
    "fisher",
    "wanda",
    "gblm",
    "blend",
    "token_fisher",
    "sparsegpt",
)
SPARSEGPT_PRIORS = ("fisher", "token_fisher")
RECONSTRUCT = ("none", "obs", "lsq")
SCOPES = ("tensor", "row", "global")
DTYPES = ("float32", "bfloat16", "float16")
ALLOCATIONS = ("uniform", "owl")
STATS_DEVICES = ("same", "cpu")


class ConfigError(ValueError):
    """A bad setting; the message is one line that names the value and what is allowed."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


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


@dataclass
class PruneConfig:
    """One pruning run. Every field is also a CLI flag (`num_samples` <-> `--num-samples`)."""

    model: str = _f("builtin:smollm2-135m", "Hub id, local folder, or builtin:smollm2-135m")
    dataset: str = _f(
        "builtin:imdb", "builtin:imdb, a Hub data set id (streamed), or a .txt/.jsonl/.csv/.parquet file"
    )
    dataset_config: str | None = _f(None, "Hub data set configuration name, if it has several")
    split: str = _f("train", "split read for calibration (builtin:imdb: train = its calibration part)")
    eval_split: str = _f("test", "split read for evaluation (builtin:imdb: test = its held-out part)")
    text_column: str = _f("text", "column holding the text in tabular sources")
    criterion: str = _f("token_fisher", f"importance score: {', '.join(CRITERIA)}")
    sparsity: float = _f(
        0.5, "fraction of target weights set to zero, in [0, 1); N:M patterns fix it at (M-N)/M"
    )
    scope: str = _f("row", f"comparison group for unstructured thresholds: {', '.join(SCOPES)}")
    pattern: str = _f("unstructured", "unstructured, or N:M such as 2:4 (keep N of every M input weights)")
    gblm_alpha: float = _f(100.0, "gblm: weight of the gradient term against the activation term")
    blend: dict = _f(
        {"weight": 1.0, "act": 1.0, "grad": 0.5},
        "blend: exponents of |w|, rms(x) and rms(g) in the score |w|^weight * rms(x)^act * rms(g)^grad",
    )
    allocation: str = _f(
        "uniform", "sparsity per decoder layer: uniform, or owl (more weights kept where outliers are)"
    )
    owl_m: float = _f(5.0, "owl: a score above owl_m x its layer's mean Wanda score is an outlier")
    owl_lambda: float = _f(0.08, "owl: layer sparsities spread over [sparsity - lambda, sparsity + lambda]")
    num_samples: int = _f(64, "calibration blocks of seq_len tokens")
    seq_len: int = _f(512, "tokens per calibration block (never defaults to the model's context)")
    batch_size: int = _f(1, "blocks per micro-batch; one gradient sample = one micro-batch")
    grad_accum: int = _f(
        1,
        "micro-batches summed into one gradient sample (sample = mean gradient of grad_accum x batch_size "
        "blocks); > 1 costs one fp32 buffer per target weight",
    )
    stats_device: str = _f(
        "same",
        "where gradient statistics live: same (as each weight) or cpu (pinned, non-blocking copies "
        "from a GPU; the GPU then holds model + activations only)",
    )
    gradient_checkpointing: bool = _f(
        False, "recompute layer activations in backward (transformers' own): less memory, ~1.3x time"
    )
    seed: int = _f(0, "seed of the calibration block order")
    dtype: str = _f("float32", f"model weights dtype: {', '.join(DTYPES)}; statistics are always fp32")
    eval: bool = _f(False, "evaluate dense and pruned perplexity on the same held-out windows")
    eval_num_samples: int = _f(64, "evaluation windows of eval_seq_len tokens (from eval_split)")
    eval_seq_len: int | None = _f(None, "tokens per evaluation window (default: seq_len)")
    eval_batch_size: int = _f(4, "evaluation windows per forward pass")
    eval_stride: int | None = _f(None, "evaluation stride < eval_seq_len: overlapping windows, more context")
    output_dir: str = _f("out/pruned", "where the pruned checkpoint and report are written")
    include: list[str] = _f([], "regexes over module names; a target must match one (empty = all)")
    exclude: list[str] = _f([], "regexes over module names; a match is never pruned")
    trust_remote_code: bool = _f(False, "allow model code from the Hub (off unless asked)")
    device: str | None = _f(None, "force a device (cpu, cuda, cuda:1); default: Accelerate's choice")
    select_chunk_elems: int = _f(
        1 << 24,
        "scores looked at per chunk in exact selection, and elements per cross-process sum (bounds memory)",
    )
    scores_dir: str | None = _f(
        None,
        "global scope: hold scores on disk in a temporary folder under this one (RAM = one chunk); "
        "default: recompute them in memory",
    )
    fsdp: bool = _f(
        False,
        "with several processes, shard the weights by rows (torch FSDP2) instead of replicating them; "
        "implied by an accelerate config with distributed_type FSDP",
    )
    max_shard_size: str = _f("5GB", "largest safetensors shard written")
    overwrite: bool = _f(False, "replace a non-empty output directory")
    progress: bool = _f(True, "show progress bars")
    checkpoint_every: int = _f(0, "save the calibration statistics every N batches (0 = never) for --resume")
    resume: bool = _f(False, "continue calibration from the last saved state (see checkpoint_every)")
    state_dir: str | None = _f(
        None, "folder of the saved calibration state (default: <output_dir>.calib-state)"
    )
    # -- layer-wise reconstruction (reconstruct.py, sequential.py) --------------------------------
    reconstruct: str = _f(
        "none",
        "none; obs: SparseGPT's left-to-right OBS updates of the kept weights (sparsegpt always does them); "
        "lsq: exact per-row least-squares refit of the kept weights (one |kept|^3 solve per row: slow)",
    )
    sequential: bool | None = _f(
        None,
        "layer-wise mode, each block calibrated on the outputs of the already-pruned blocks before it "
        "(default: on for sparsegpt and reconstruct obs/lsq, off otherwise)",
    )
    true_sequential: bool = _f(
        False,
        "layer-wise mode: inside each block, prune its targets in stages of modules sharing one input "
        "(q/k/v, o, gate/up, down), each stage calibrated after the stages before it are pruned",
    )
    blocksize: int = _f(128, "columns per block of OBS updates (a multiple of M for N:M)")
    percdamp: float = _f(0.01, "Hessian damping as a fraction of its mean diagonal")
    offload_inputs: bool = _f(False, "layer-wise mode: keep the recorded block inputs on CPU")
    sparsegpt_grad_exp: float = _f(
        0.0, "sparsegpt: multiply the OBS saliency by a gradient factor^exp (0 = plain SparseGPT)"
    )
    sparsegpt_prior: str = _f(
        "fisher",
        "sparsegpt's gradient factor: fisher = E[g^2] per weight; token_fisher = E_t[(dL/dy_i x_j)^2] / "
        "E_t[x_j^2], the output-side curvature per weight",
    )

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion {self.criterion!r} is unknown: choose one of {', '.join(CRITERIA)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope {self.scope!r} is unknown: choose one of {', '.join(SCOPES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
        if not isinstance(self.sparsity, int | float) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity {self.sparsity!r} is outside [0, 1)")
        self.sparsity = float(self.sparsity)
        self.nm = parse_pattern(self.pattern)
        if self.stats_device not in STATS_DEVICES:
            raise ConfigError(f"stats_device {self.stats_device!r} is unknown: choose one of same, cpu")
        if not isinstance(self.grad_accum, int) or isinstance(self.grad_accum, bool) or self.grad_accum < 1:
            raise ConfigError(f"grad_accum {self.grad_accum!r} must be an integer >= 1")
        for name in ("num_samples", "seq_len", "batch_size", "select_chunk_elems"):
            value = getattr(self, name)
            low = 0 if name == "num_samples" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} {value!r} must be an integer >= {low}")
        for name in ("eval_num_samples", "eval_batch_size", "eval_seq_len", "eval_stride"):
            value = getattr(self, name)
            if value is None and name in ("eval_seq_len", "eval_stride"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} {value!r} must be an integer >= 1")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"allocation {self.allocation!r} is unknown: choose one of {', '.join(ALLOCATIONS)}"
            )
        if self.allocation == "owl":
            if self.scope == "global" and self.pattern == "unstructured":
                raise ConfigError(
                    "allocation 'owl' sets one sparsity per layer: use scope tensor or row, not global"
                )
            if self.pattern != "unstructured":
                raise ConfigError(
                    f"allocation 'owl' needs an unstructured pattern: {self.pattern!r} fixes every layer's sparsity"
                )
            if self.num_samples == 0:
                raise ConfigError("allocation 'owl' needs activation statistics but num_samples is 0")
        for name in ("owl_m", "owl_lambda"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} {value!r} must be a number >= 0")
            setattr(self, name, float(value))
        ce = self.checkpoint_every
        if not isinstance(ce, int) or isinstance(ce, bool) or ce < 0:
            raise ConfigError(f"checkpoint_every {ce!r} must be an integer >= 0 (batches; 0 = never)")
        if self.num_samples == 0 and self.criterion != "magnitude":
            raise ConfigError(f"criterion {self.criterion!r} needs calibration data but num_samples is 0")
        if self.num_samples and self.num_samples < self.batch_size:
            raise ConfigError(f"batch_size {self.batch_size} is larger than num_samples {self.num_samples}")
        if not isinstance(self.blend, dict) or set(self.blend) - {"weight", "act", "grad"}:
            raise ConfigError(f"blend {self.blend!r} must map some of weight, act, grad to numbers")
        self.blend = {"weight": 1.0, "act": 1.0, "grad": 0.5, **{k: float(v) for k, v in self.blend.items()}}
        if self.nm is not None:
            self.sparsity = 1.0 - self.nm[0] / self.nm[1]
        if self.scores_dir is not None and (self.scope != "global" or self.nm is not None):
            raise ConfigError(f"scores_dir {self.scores_dir!r} is used only by the unstructured global scope")
        self._check_reconstruction()
        for name in ("include", "exclude"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])

    def _check_reconstruction(self) -> None:
        if self.reconstruct not in RECONSTRUCT:
            raise ConfigError(
                f"reconstruct {self.reconstruct!r} is unknown: choose one of {', '.join(RECONSTRUCT)}"
            )
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential {self.sequential!r} must be true or false")
        if not isinstance(self.true_sequential, bool):
            raise ConfigError(f"true_sequential {self.true_sequential!r} must be true or false")
        if self.true_sequential and (self.sequential is False or not self.layer_wise):
            raise ConfigError(
                "true_sequential needs sequential layer-wise mode (criterion sparsegpt, reconstruct "
                "obs/lsq, or sequential: true), not sequential: "
                f"{self.sequential} with reconstruct {self.reconstruct!r}"
            )
        if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool) or self.blocksize < 1:
            raise ConfigError(f"blocksize {self.blocksize!r} must be an integer >= 1")
        if self.layer_wise and self.nm is not None and self.blocksize % self.nm[1]:
            raise ConfigError(
                f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]} of pattern {self.pattern}"
            )
        if not isinstance(self.percdamp, int | float) or not 0.0 < float(self.percdamp) <= 10.0:
            raise ConfigError(f"percdamp {self.percdamp!r} must be in (0, 10]")
        self.percdamp = float(self.percdamp)
        if not isinstance(self.sparsegpt_grad_exp, int | float) or self.sparsegpt_grad_exp < 0:
            raise ConfigError(f"sparsegpt_grad_exp {self.sparsegpt_grad_exp!r} must be a number >= 0")
        if self.sparsegpt_prior not in SPARSEGPT_PRIORS:
            raise ConfigError(
                f"sparsegpt_prior {self.sparsegpt_prior!r} is unknown: choose one of {', '.join(SPARSEGPT_PRIORS)}"
            )
        if self.sparsegpt_grad_exp and self.criterion != "sparsegpt":
            raise ConfigError(
                f"sparsegpt_grad_exp {self.sparsegpt_grad_exp} applies to criterion sparsegpt only"
            )
        if self.layer_wise and (self.checkpoint_every or self.resume):
            raise ConfigError(
                "checkpoint_every/resume cover the whole-model calibration only: not in layer-wise mode"
            )
        if self.layer_wise and self.scope == "global" and self.nm is None and self.criterion != "sparsegpt":
            from . import criteria  # late: criteria imports nothing from here, but keep config light

            if "act_sq_sum" in criteria.get(self.criterion).accumulators:
                raise ConfigError(
                    f"scope 'global' with criterion {self.criterion!r} is not available in layer-wise mode: "
                    "its scores read each block's pruned-input activations, which exist only one block "
                    "at a time (use scope row/tensor, or a criterion without activation statistics)"
                )

    @property
    def layer_wise(self) -> bool:
        """Whether the block-by-block executor runs (sparsegpt, reconstruction, or sequential asked)."""
        return self.criterion == "sparsegpt" or self.reconstruct != "none" or bool(self.sequential)

    # -- I/O ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruneConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PruneConfig:
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
        return cls.from_dict({**values, **overrides})
