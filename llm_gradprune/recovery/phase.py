"""Recovery as a phase of a job: the training text, the teacher, the resumable state, the report.

Used by the prune job (a `recover:` section runs right after pruning) and by `llm-gradprune recover`
(a pruned folder in, a recovered pruned folder out). Training text is the job's calibration split read
in another order (`recover.seed`), so held-out evaluation text is never trained on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.data import load_blocks, micro_batches, shard, token_hash
from ..errors import ConfigError
from ..io.calib_state import config_identity, model_fingerprint
from ..parallel import collective_for
from ..status import set_stage
from ..targets import find_targets
from .state import RecoverState
from .trainer import recover_


def training_batches(cfg, tokenizer, rank: int = 0, world: int = 1) -> tuple[list[torch.Tensor], str] | None:
    """This rank's micro-batches for every step of recovery (and of the rounds in between), or None."""
    rec = cfg.recover
    steps = rec.steps + rec.round_steps * max(0, cfg.prune.rounds - 1)
    if not steps:
        return None
    n = steps * rec.grad_accum * rec.batch_size * world
    blocks = load_blocks(cfg, tokenizer, num_blocks=n, seed=rec.seed, seq_len=rec.seq_len or cfg.seq_len)
    return shard(micro_batches(blocks, rec.batch_size), rank, world), token_hash(blocks)


def recovery_state(cfg, model: nn.Module, data_hash: str) -> RecoverState | None:
    if not cfg.recover.save_state_every and not cfg.resume:
        return None
    out = Path(cfg.output_dir).expanduser().resolve()
    folder = out.with_name(out.name + ".recover-state")
    identity = {"config": config_identity(cfg), "model": model_fingerprint(model), "data": data_hash}
    return RecoverState(folder, cfg.recover.save_state_every, cfg.resume, identity)


def load_teacher(cfg, base: str | None) -> nn.Module | None:
    """The dense teacher: `recover.teacher`, else the base model the pruned one came from."""
    if not cfg.recover.distills:
        return None
    from ..models import load_model

    name = cfg.recover.teacher or base
    if not name:
        raise ConfigError(
            "recover distill_alpha needs a teacher: give recover teacher (the dense base model)"
        )
    set_stage("loading the teacher")
    teacher, _, _ = load_model(dataclasses.replace(cfg, model=name))
    return teacher


def recount_zeros_(report: dict[str, Any], model: nn.Module) -> None:
    """Per-tensor zero counts of the model as it is now (after training), summed over row shards."""
    coll = collective_for(model)
    weights = {f"{n}.weight": m.weight for n, m in find_targets(model).items()}
    names = [n for n in report["per_tensor"] if n in weights]
    counts = coll.sum_scalars([float(int((coll.local(weights[n]) == 0).sum())) for n in names]) if coll.rows_sharded \
        else [float(int((weights[n] == 0).sum())) for n in names]  # fmt: skip
    for name, zeros in zip(names, counts, strict=True):
        report["per_tensor"][name]["zeros"] = int(zeros)
    report["zero_weights"] = sum(t["zeros"] for t in report["per_tensor"].values())
    report["overall_sparsity"] = report["zero_weights"] / report["target_weights"]


def run_recovery(cfg, model, tokenizer, data, *, base: str | None, eval_blocks=None, accelerator=None,
                 report: dict[str, Any]) -> nn.Module:  # fmt: skip
    """Train, then fold the result into `report` (recovery section, zero counts); returns the model."""
    batches, data_hash = data
    teacher = load_teacher(cfg, base)
    state = recovery_state(cfg, model, data_hash)
    set_stage("recovery training")
    model, rec = recover_(model, batches, cfg.recover, teacher=teacher, eval_blocks=eval_blocks, accelerator=accelerator,
                          state=state, progress=cfg.prune.progress)  # fmt: skip
    rec["data"] = {"name": cfg.dataset, "split": cfg.split, "seed": cfg.recover.seed, "token_sha256": data_hash,
                   "seq_len": cfg.recover.seq_len or cfg.seq_len}  # fmt: skip
    rec["teacher"] = (cfg.recover.teacher or base) if teacher is not None else None
    report["recovery"] = rec
    if "per_tensor" in report:  # a structured run records shapes instead, which training does not change
        recount_zeros_(report, model)
    if state is not None:
        report["recovery"]["state_folder"] = str(state.dir)
    return model


def read_report(folder: Path) -> dict[str, Any]:
    path = folder / "pruning_report.json"
    if not path.is_file():
        raise ConfigError(
            f"{str(folder)!r} is not an llm-gradprune output (no pruning_report.json): recover takes one"
        )
    return json.loads(path.read_text())
