"""What the job reads: the model, the text and the teacher, turned from the job's settings into the
small typed arguments the lower stages take (they never see `JobConfig`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..calibration.assets import resolve_model
from ..calibration.data import TextSource, load_samples, micro_batches, round_robin, token_hash
from ..config import JobConfig
from ..errors import ConfigError, hub_unreachable, unreachable
from ..models import load_model, looks_local
from ..status import set_stage


def text_source(cfg: JobConfig, split: str | None = None, seed: int | None = None) -> TextSource:
    return TextSource(cfg.dataset, split or cfg.split, cfg.text_column, cfg.seed if seed is None else seed,
                      cfg.dataset_config)  # fmt: skip


def load(cfg: JobConfig, name: str | None = None):
    """(model, tokenizer, path) of `name` (default the job's model) with the job's dtype and trust. The
    job's own model under `offload: disk` is a skeleton unless whole-model statistics need its weights."""
    from ..plan import needs_whole_model
    from ..structured.shrink import needs_whole_model as structure_needs_whole

    whole = (
        structure_needs_whole(cfg.structured) if cfg.structured is not None else needs_whole_model(cfg.prune)
    )
    weights = name is not None or cfg.offload != "disk" or whole
    return load_model(name or cfg.model, cfg.dtype, cfg.trust_remote_code, weights=weights)


def check_context(model, seq_len: int, what: str = "seq_len") -> None:
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"{what} {seq_len} is larger than the model's context of {context} tokens")


def calibration_samples(cfg: JobConfig, tokenizer) -> torch.Tensor:
    return load_samples(text_source(cfg), tokenizer, cfg.num_samples, cfg.seq_len)


def held_out_samples(cfg: JobConfig, tokenizer, model=None) -> torch.Tensor:
    """The held-out windows `cfg` describes (eval_split, eval_num_samples x eval_seq_len tokens)."""
    seq_len = cfg.eval_seq_len or cfg.seq_len
    check_context(model, seq_len, "eval_seq_len")
    return load_samples(text_source(cfg, split=cfg.eval_split), tokenizer, cfg.eval_num_samples, seq_len)


def training_batches(cfg: JobConfig, tokenizer, rank: int = 0, world: int = 1):
    """(this rank's micro-batches for every step of recovery and of the rounds in between, their
    token hash), or None. The calibration split in another order (`recover.seed`), so held-out text
    is never trained on."""
    rec = cfg.recover
    steps = rec.steps + rec.round_steps * max(0, cfg.prune.rounds - 1)
    if not steps:
        return None
    n = steps * rec.grad_accum * rec.batch_size * world
    try:
        blocks = load_samples(text_source(cfg, seed=rec.seed), tokenizer, n, rec.seq_len or cfg.seq_len)
    except ConfigError as err:  # too little text: name the flags that asked for it, not num_samples
        asks = f"num_samples asks for {n}"
        if not str(err).endswith(asks):
            raise
        each = f"recover_batch_size {rec.batch_size} x recover_grad_accum {rec.grad_accum}" + (
            f" x {world} processes" if world > 1 else ""
        )
        raise ConfigError(
            f"{str(err)[: -len(asks)]}recovery training asks for {n} ({steps} steps x {each}): lower "
            "--recover-steps, or give more text"
        ) from None
    return round_robin(micro_batches(blocks, rec.batch_size), rank, world), token_hash(blocks)


def _teacher(cfg: JobConfig, base: str | None) -> tuple[str, str] | None:
    """(the teacher's name, how the user names it in a message), or None when nothing distills."""
    if not (cfg.recover.steps and cfg.recover.distills):
        return None
    if cfg.recover.teacher:
        return cfg.recover.teacher, f"recover_teacher {cfg.recover.teacher!r}"
    if not base:
        raise ConfigError(
            "recover_distill_alpha needs a teacher: give recover_teacher (--recover-teacher, the dense base model)"
        )
    return base, f"the teacher (by default the base model {base!r} the pruned folder was made from)"


def _teacher_config(cfg: JobConfig, name: str, what: str):
    """The teacher's config, read without its weights; one line naming the teacher when it cannot be."""
    from transformers import AutoConfig

    path = resolve_model(name)
    if looks_local(path) and not (Path(path).expanduser() / "config.json").is_file():
        problem = "has no config.json" if Path(path).expanduser().is_dir() else "does not exist"
        raise ConfigError(
            f"{what} {problem}: give --recover-teacher, the dense model the pruned one came from"
        )
    try:
        return AutoConfig.from_pretrained(str(Path(path).expanduser()) if looks_local(path) else path,
                                          trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - every failure to read it is about the teacher the user named
        if unreachable(err):
            raise ConfigError(f"{what}: {hub_unreachable('teacher model', name)}") from None
        if not isinstance(err, OSError | ValueError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{what} cannot be read: {first}") from None


def _vocab(config) -> int | None:
    return getattr(config.get_text_config(), "vocab_size", None)


def check_teacher(cfg: JobConfig, base: str | None, model) -> None:
    """When the run is planned: the teacher exists and predicts over the model's vocabulary, as the
    distillation loss compares the two next-token distributions token by token."""
    teacher = _teacher(cfg, base)
    if teacher is None or (not cfg.recover.teacher and base == cfg.model):  # the model itself, dense
        return
    name, what = teacher
    theirs, ours = _vocab(_teacher_config(cfg, name, what)), _vocab(model.config)
    if theirs is not None and ours is not None and theirs != ours:
        raise ConfigError(
            f"{what} has a vocabulary of {theirs} tokens and the model {ours}: the teacher must share the "
            "model's tokenizer"
        )


def load_teacher(cfg: JobConfig, base: str | None):
    """The dense teacher: `recover.teacher`, else the base model the pruned one came from."""
    teacher = _teacher(cfg, base)
    if teacher is None:
        return None
    set_stage("loading the teacher")
    try:
        return load(cfg, teacher[0])[0]
    except ConfigError as err:
        raise ConfigError(f"{teacher[1]}: {err}") from None


def with_training_seq_len(cfg: JobConfig) -> JobConfig:
    """`recover` reads one block length: training windows and held-out windows alike."""
    if cfg.recover.seq_len is None:
        return cfg
    return dataclasses.replace(cfg, seq_len=cfg.recover.seq_len)
