"""What the job reads: the model, the text and the teacher, turned from the job's settings into the
small typed arguments the lower stages take (they never see `JobConfig`)."""

from __future__ import annotations

import dataclasses

import torch

from ..calibration.data import TextSource, load_samples, micro_batches, round_robin, token_hash
from ..config import JobConfig
from ..errors import ConfigError
from ..models import load_model
from ..status import set_stage


def text_source(cfg: JobConfig, split: str | None = None, seed: int | None = None) -> TextSource:
    return TextSource(cfg.dataset, split or cfg.split, cfg.text_column, cfg.seed if seed is None else seed,
                      cfg.dataset_config)  # fmt: skip


def load(cfg: JobConfig, name: str | None = None):
    """(model, tokenizer, path) of `name` (default the job's model) with the job's dtype and trust."""
    return load_model(name or cfg.model, cfg.dtype, cfg.trust_remote_code)


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
    blocks = load_samples(text_source(cfg, seed=rec.seed), tokenizer, n, rec.seq_len or cfg.seq_len)
    return round_robin(micro_batches(blocks, rec.batch_size), rank, world), token_hash(blocks)


def load_teacher(cfg: JobConfig, base: str | None):
    """The dense teacher: `recover.teacher`, else the base model the pruned one came from."""
    if not cfg.recover.distills:
        return None
    name = cfg.recover.teacher or base
    if not name:
        raise ConfigError(
            "recover_distill_alpha needs a teacher: give recover_teacher (--recover-teacher, the dense base model)"
        )
    set_stage("loading the teacher")
    return load(cfg, name)[0]


def with_training_seq_len(cfg: JobConfig) -> JobConfig:
    """`recover` reads one block length: training windows and held-out windows alike."""
    if cfg.recover.seq_len is None:
        return cfg
    return dataclasses.replace(cfg, seq_len=cfg.recover.seq_len)
