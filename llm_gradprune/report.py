"""The report of a run, typed: what `pruning_report.json` holds, as frozen dataclasses the readers (the
card, the plots, push, the CLI summaries) read by field.

The dict stays the written form: the builders (plan.build_report, structured/report.py, the job) fill a
dict and save it as it is, so old folders keep loading. `Report.from_dict` reads one, from this version or
an older one: a key a folder lacks takes its field's default (None, 0 or empty), a key it has that no field
names is ignored. Every field is named after its JSON key, so `getattr(section, f) == d[f]`.

A report has one `calibration` record whatever the run (`CALIBRATION_RECORD`), then one of two bodies:
`sparsity` (kind "sparse": weights zeroed, shapes kept) or `shrinking` (kind "structured": whole units
removed, a smaller dense model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def calibration_record(**values: Any) -> dict[str, Any]:
    """The report's `calibration` section: the fields of `Calibration`, one set of keys for every kind of
    run (unknown keys refused, so the kinds cannot drift apart again)."""
    unknown = set(values) - {f.name for f in fields(Calibration)}
    if unknown:
        raise KeyError(f"not calibration record fields: {sorted(unknown)}")
    return asdict(Calibration(**values))  # a fresh copy: no two reports share a default list


def _sub(cls) -> Callable[[Any], Any]:
    """The parser of a plain sub-section."""
    return lambda d: _parse(cls, d)


def _parse(cls, d: dict[str, Any] | None, **nested: Callable[[Any], Any]):
    """`cls` from a report section: its fields that `d` has (`nested` converts sub-sections), the rest
    defaulted; None stays None (a section the run did not have)."""
    if d is None:
        return None
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in d.items() if k in names}
    for key, convert in nested.items():
        if values.get(key) is not None:
            values[key] = convert(values[key])
    return cls(**values)


LEGACY_CALIBRATION_KEYS = {"blocks": "samples", "gradient_samples": "gradients"}


@dataclass(frozen=True)
class Calibration:
    """What the calibration read (the job fills samples, seq_len, batch_size and token_sha256; a library
    call leaves them None) and did: gradient passes (unstructured) or structured passes (`passes`)."""

    samples: int | None = None  # token sequences of seq_len read
    seq_len: int | None = None
    batch_size: int | None = None
    token_sha256: str | None = None
    batches: int = 0
    tokens: int = 0
    grad_accum: int | None = None
    gradients: int = 0  # one per accumulation of grad_accum micro-batches
    stats_device: str | None = None
    gradient_checkpointing: bool | None = None
    recomputed_layers: int = 0
    mean_loss: float | None = None
    statistics: list[str] = field(default_factory=list)
    skipped_nonfinite: dict[str, int] = field(default_factory=dict)  # per tensor: non-finite batches skipped
    processes: int = 1
    sharding: str | None = None
    reduce: Any = None
    resumed_from_batch: int | None = None
    state_saves: int = 0
    passes: dict[str, Any] | None = None  # structured runs: the calibration passes shrink_ made
    threads: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Calibration:
        if d is None:
            return cls()
        # reports saved before the names settled: "blocks" were samples, "gradient_samples" gradients
        renamed = {LEGACY_CALIBRATION_KEYS.get(k, k): v for k, v in d.items()}
        return _parse(cls, renamed)


CALIBRATION_RECORD = asdict(Calibration())  # the keys and defaults, in order


@dataclass(frozen=True)
class Evaluation:
    """Held-out perplexity before and after, on the same windows (dense is None when unknown)."""

    dense_ppl: float | None = None
    pruned_ppl: float | None = None
    dense_nll: float | None = None
    pruned_nll: float | None = None
    tokens: int | None = None
    windows: int | None = None
    split: str | None = None
    seq_len: int | None = None
    stride: int | None = None
    token_sha256: str | None = None
    recovered_ppl: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Evaluation | None:
        return _parse(cls, d)


@dataclass(frozen=True)
class EvalTasks:
    """lm-eval scores per task and metric of the model before, after and after recovery."""

    lm_eval_version: str | None = None
    num_fewshot: int = 0
    dense: dict[str, dict[str, float]] = field(default_factory=dict)
    pruned: dict[str, dict[str, float]] = field(default_factory=dict)
    recovered: dict[str, dict[str, float]] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EvalTasks | None:
        return _parse(cls, d)


@dataclass(frozen=True)
class RecoveryData:
    """The text recovery trained on."""

    name: str | None = None
    split: str | None = None
    seed: int | None = None
    token_sha256: str | None = None
    seq_len: int | None = None


@dataclass(frozen=True)
class Recovery:
    """Masked recovery training: recovery/trainer.py's record plus the job's data, teacher and state."""

    steps: int = 0
    tokens: int = 0
    resumed_from_step: int = 0
    seconds: float = 0.0
    lr: float | None = None
    warmup_steps: int | None = None
    schedule: str | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    bf16: bool | None = None
    master_weights: str | None = None
    gradient_checkpointing: bool | None = None
    distill_alpha: float = 0.0
    temperature: float | None = None
    lora_r: int = 0
    trained_tensors: int | None = None
    trained_weights: int | None = None
    pruned_kept_zero: bool | None = None
    final_loss: float | None = None
    held_out_ppl: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss"} and {"step", "ppl"} entries
    data: RecoveryData = field(default_factory=RecoveryData)
    teacher: str | None = None
    state_folder: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Recovery | None:
        return _parse(cls, d, data=_sub(RecoveryData))


@dataclass(frozen=True)
class TensorCount:
    """One pruned tensor: weights, weights the mask pruned, zeros now (N:M runs: whether every group fits)."""

    numel: int
    masked: int = 0
    zeros: int = 0
    nm_groups_valid: int | None = None


@dataclass(frozen=True)
class Mode:
    """How the pruning ran: executor, mask and weight update, and their knobs."""

    executor: str | None = None
    layer_wise: bool | None = None
    mask: str | None = None
    reconstruct: str | None = None
    sequential: bool | None = None
    true_sequential: bool | None = None
    blocksize: int | None = None
    percdamp: float | None = None
    offload_inputs: bool | None = None
    stages_per_block: int | None = None
    scores_on_disk: bool | None = None


@dataclass(frozen=True)
class Rounds:
    """Pruning in rounds: one entry per round (its target, sparsity reached and calibration loss)."""

    count: int
    schedule: str | None = None
    per_round: list[dict[str, Any]] = field(default_factory=list)


def _counts(per_tensor: dict[str, dict[str, Any]]) -> dict[str, TensorCount]:
    return {name: _parse(TensorCount, t) for name, t in per_tensor.items()}


@dataclass(frozen=True)
class Sparsity:
    """The body of a sparse run's report: which weights became zero, how, and where."""

    criterion: str | None = None
    criterion_params: dict[str, Any] = field(default_factory=dict)
    scope: str | None = None
    pattern: str | None = None
    target_sparsity: float | None = None
    allocation_method: str | None = None
    allocation_params: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] | None = None
    targets: int = 0
    target_weights: int = 0
    masked_weights: int = 0
    zero_weights: int = 0
    overall_sparsity: float = 0.0
    empty_tensors: list[str] = field(default_factory=list)
    rounds: Rounds | None = None
    mode: Mode = field(default_factory=Mode)
    hessian_bytes: dict[str, Any] | None = None
    peak_memory_bytes: dict[str, Any] | None = None
    matrices: dict[str, Any] | None = None  # what is pruned per kind, routers and what is left
    experts: dict[str, Any] | None = None  # routed tokens per expert, the experts that got none
    # matrices written in another layout: the file tensors holding them
    stored_as: dict[str, list] | None = None
    # sha256 of every tensor as written, keyed as in the files: push refuses edited weights
    tensor_sha256: dict[str, str] | None = None
    per_tensor: dict[str, TensorCount] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sparsity:
        return _parse(cls, d, rounds=_sub(Rounds), mode=_sub(Mode), per_tensor=_counts)


@dataclass(frozen=True)
class ModelShape:
    """A decoder's widths and counts (the config keys a stock config describes)."""

    num_hidden_layers: int
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    moe_intermediate_size: int | None = None  # an MoE's expert width, where the config has its own key
    shared_expert_intermediate_size: int | None = None
    num_local_experts: int | None = None  # routed experts per MoE layer, under the config's own key
    num_experts: int | None = None
    n_routed_experts: int | None = None

    def rows(self) -> list[tuple[str, str, int]]:
        """(config key, what it counts, value) of every count this shape has, for tables and plots."""
        return [(f.name, SHAPE_LABELS.get(f.name, f.name), getattr(self, f.name)) for f in fields(self)
                if f.name in SHAPE_LABELS and getattr(self, f.name) is not None]  # fmt: skip


SHAPE_LABELS = {"num_hidden_layers": "decoder layers", "intermediate_size": "MLP channels",
                "moe_intermediate_size": "channels per expert", "shared_expert_intermediate_size": "shared expert channels",
                "num_attention_heads": "query heads per layer", "num_key_value_heads": "key/value heads per layer",
                "num_local_experts": "experts per MoE layer", "num_experts": "experts per MoE layer",
                "n_routed_experts": "experts per MoE layer"}  # fmt: skip


@dataclass(frozen=True)
class Params:
    decoder: int
    total: int


@dataclass(frozen=True)
class Importance:
    name: str
    form: str | None = None
    loss_scale: bool | None = None


@dataclass(frozen=True)
class Removed:
    """The units removed: layers, and per layer the MLP channels and heads (ids keyed by layer index)."""

    layers: list[int] = field(default_factory=list)
    channels_per_layer: int = 0
    channels_per_group: dict[str, int] = field(default_factory=dict)  # per width key (dense, experts, shared)
    query_heads_per_layer: int = 0
    kv_heads_per_layer: int = 0
    experts_per_layer: int = 0
    channels: dict[str, Any] = field(default_factory=dict)  # a list per layer, or {MLP: list} with several
    kv_heads_kept: dict[str, list[int]] = field(default_factory=dict)
    query_heads_kept: dict[str, list[int]] = field(default_factory=dict)
    experts_kept: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Compensation:
    """How the layers after the removed units were refit, and the errors left (mean and max)."""

    compensate: str | None = None
    refit_inputs: str | None = None
    mean_bias: bool = False
    removed_error: dict[str, float] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shrinking:
    """The body of a structured run's report: the shape, parameters and bytes before and after."""

    structure: str
    config: dict[str, Any] = field(default_factory=dict)  # the structured settings
    importance: Importance | None = None
    shape_before: ModelShape | None = None
    shape_after: ModelShape | None = None
    params_before: Params | None = None
    params_after: Params | None = None
    decoder_kept: float | None = None
    removed: Removed = field(default_factory=Removed)
    estimated_cost: float | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    compensation: Compensation = field(default_factory=Compensation)
    transformers: str | None = None
    file_bytes_before: int | None = None
    tensor_shapes: dict[str, list[int]] | None = None  # every tensor's shape: what push verifies

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shrinking:
        return _parse(cls, d, importance=_sub(Importance), shape_before=_sub(ModelShape),
                      shape_after=_sub(ModelShape), params_before=_sub(Params), params_after=_sub(Params),
                      removed=_sub(Removed), compensation=_sub(Compensation))  # fmt: skip


@dataclass(frozen=True)
class BaseModel:
    """The model that was pruned, by names a user can read (Hub id, or a local folder's own name)."""

    name: str | None = None
    hub_id: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class Dataset:
    name: str | None = None
    split: str | None = None
    text_column: str | None = None


@dataclass(frozen=True)
class Plots:
    files: list[str] = field(default_factory=list)
    skipped: str | None = None  # why no plot was drawn


@dataclass(frozen=True)
class Push:
    """What a push sent (or, with dry_run, would send); `error` alone when it failed."""

    repo_id: str | None = None
    endpoint: str | None = None
    url: str | None = None
    revision: str | None = None
    private: bool = False
    files: list[dict[str, Any]] = field(default_factory=list)
    total_bytes: int = 0
    commit_message: str | None = None
    dry_run: bool = False
    commit_url: str | None = None
    commit_oid: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Report:
    """One run's report. `kind` says which body it has: `sparsity` ("sparse") or `shrinking` ("structured").

    `push` and `output_dir` exist only in the report a job returns, never in the saved file."""

    kind: str
    sparsity: Sparsity | None = None
    shrinking: Shrinking | None = None
    calibration: Calibration = field(default_factory=Calibration)
    eval: Evaluation | None = None
    eval_tasks: EvalTasks | None = None
    recovery: Recovery | None = None
    model: str | None = None
    dataset: Dataset | None = None
    seed: int | None = None
    base_model: BaseModel | None = None
    calibration_dataset: str | None = None
    notes: list[str] = field(default_factory=list)
    verified: bool = False
    file_bytes: int | None = None
    plots: Plots | None = None
    push: Push | None = None
    output_dir: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    pruning_timings_s: dict[str, float] | None = None  # a recovered folder: the pruning run's timings
    recovered_from: str | None = None  # a recovered folder: the pruned folder's name

    @property
    def structured(self) -> bool:
        return self.kind == "structured"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """The report a dict (pruning_report.json, or the one a job returns) holds."""
        kind, body = ("structured", "shrinking") if d.get("structure") else ("sparse", "sparsity")
        common = {k: v for k, v in d.items() if k not in ("kind", "sparsity", "shrinking")}
        return _parse(cls, {**common, "kind": kind, body: d}, sparsity=Sparsity.from_dict,
                      shrinking=Shrinking.from_dict, calibration=Calibration.from_dict, eval=Evaluation.from_dict,
                      eval_tasks=EvalTasks.from_dict, recovery=Recovery.from_dict, dataset=_sub(Dataset),
                      base_model=_sub(BaseModel), plots=_sub(Plots), push=_sub(Push))  # fmt: skip


def as_report(report: Report | dict[str, Any]) -> Report:
    """A Report as it is; a report dict parsed (the readers take either)."""
    return report if isinstance(report, Report) else Report.from_dict(report)
