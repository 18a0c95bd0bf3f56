"""Recovery as a step of the job: the teacher, the resumable training state, the report's section.

Used after every transform (prune, rounds, shrink) and as the whole point of `llm-gradprune recover`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import JobConfig
from ..io.calib_state import run_identity
from ..parallel import collective_for
from ..recovery.state import RecoverState, saved_state
from ..recovery.trainer import recover_
from ..report import as_report
from ..status import set_stage
from ..targets import find_targets
from .inputs import load_teacher


def settings_identity(cfg: JobConfig, with_recovery: bool = False) -> dict[str, Any]:
    """The settings a saved state depends on (all but run control); a training state also depends on
    the training settings, so a resume with another lr is refused instead of silently ignored."""
    return cfg.identity(with_recovery=with_recovery)


def training_state_dir(cfg: JobConfig) -> Path:
    """`<output_dir>.recover-state`: where the training state of the run is saved."""
    out = Path(cfg.output_dir).expanduser().resolve()
    return out.with_name(out.name + ".recover-state")


def saved_training_step(cfg: JobConfig) -> int | None:
    """The step of the newest training state the run `cfg` saved and `--resume` continues, or None."""
    if not cfg.recover.steps or not (cfg.recover.save_state_every or cfg.resume):
        return None
    found = saved_state(training_state_dir(cfg))
    return None if found is None else found[1]


def recovery_state(cfg: JobConfig, model: nn.Module, data_hash: str) -> RecoverState | None:
    if not cfg.recover.save_state_every and not cfg.resume:
        return None
    identity = run_identity(settings_identity(cfg, with_recovery=True), model, data_hash)
    return RecoverState(training_state_dir(cfg), cfg.recover.save_state_every, cfg.resume, identity)


def recount_zeros_(report: dict[str, Any], model: nn.Module) -> None:
    """Per-tensor zero counts of the model as it is now (after training), summed over row shards."""
    coll = collective_for(model)
    weights = {t.key: t.weight for t in find_targets(model).values()}
    names = [n for n in report["per_tensor"] if n in weights]
    counts = coll.sum_scalars([float(int((coll.local(weights[n]) == 0).sum())) for n in names]) if coll.rows_sharded \
        else [float(int((weights[n] == 0).sum())) for n in names]  # fmt: skip
    for name, zeros in zip(names, counts, strict=True):
        report["per_tensor"][name]["zeros"] = int(zeros)
    report["zero_weights"] = sum(t["zeros"] for t in report["per_tensor"].values())
    report["overall_sparsity"] = report["zero_weights"] / report["target_weights"]


def recovery_step(cfg: JobConfig, model, data, report: dict[str, Any], *, base: str | None, accelerator=None,
                 held_out=None) -> tuple[nn.Module, RecoverState | None]:  # fmt: skip
    """Train, then fold the result into `report` (recovery section, zero counts): (model, saved state)."""
    batches, data_hash = data
    teacher = load_teacher(cfg, base)
    state = recovery_state(cfg, model, data_hash)
    set_stage("recovery training")
    model, rec = recover_(model, batches, cfg.recover, teacher=teacher, held_out=held_out, accelerator=accelerator,
                          state=state, progress=cfg.prune.progress)  # fmt: skip
    rec["data"] = {"name": cfg.dataset, "split": cfg.split, "seed": cfg.recover.seed, "token_sha256": data_hash,
                   "seq_len": cfg.recover.seq_len or cfg.seq_len}  # fmt: skip
    rec["teacher"] = (cfg.recover.teacher or base) if teacher is not None else None
    if state is not None:
        rec["state_folder"] = str(state.dir)
    report["recovery"] = rec
    if not as_report(report).structured:  # a structured run records shapes instead, which training keeps
        recount_zeros_(report, model)
    return model, state
