"""Held-out perplexity and lm-eval task scores inside a job, and `llm-gradprune eval` on its own."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..calibration.data import token_hash
from ..config import JobConfig
from ..evaluate import perplexity
from ..status import set_stage
from ..tasks import check_tasks, run_tasks
from .inputs import held_out_samples, load
from .preflight import check_device


def held_out_perplexity(cfg: JobConfig, model, blocks, device=None, progress: bool = True) -> dict[str, Any]:
    return perplexity(model, blocks, batch_size=cfg.eval_batch_size, stride=cfg.eval_stride,
                      progress=progress and cfg.prune.progress, device=device)  # fmt: skip


def task_scores(cfg: JobConfig, model, tokenizer, which: str, timings: dict) -> dict | None:
    """lm-eval scores of the model as it is now, or None when no task was asked for."""
    if not cfg.eval_tasks:
        return None
    set_stage(f"scoring lm-eval tasks on the {which} model")
    t = time.perf_counter()
    out = run_tasks(model, tokenizer, cfg.eval_tasks, include_path=cfg.eval_tasks_include_path,
                    batch_size=cfg.eval_batch_size, limit=cfg.eval_tasks_limit, num_fewshot=cfg.eval_tasks_fewshot)  # fmt: skip
    timings[f"eval_tasks_{which}"] = time.perf_counter() - t
    return out


def tasks_section(dense: dict | None, pruned: dict | None) -> dict | None:
    """Task scores after the transform beside those before, or None when no task was asked for."""
    if dense is None or pruned is None:
        return None
    return {
        **{k: v for k, v in pruned.items() if k != "tasks"},
        "dense": dense["tasks"],
        "pruned": pruned["tasks"],
    }


def eval_section(cfg: JobConfig, dense: dict | None, pruned: dict, held_out) -> dict[str, Any]:
    """The report's `eval` record: the same windows before and after (dense may be unknown: None)."""
    return {
        "dense_ppl": None if dense is None else dense["ppl"],
        "pruned_ppl": pruned["ppl"],
        "dense_nll": None if dense is None else dense["nll"],
        "pruned_nll": pruned["nll"],
        "tokens": pruned["tokens"],
        "windows": pruned["windows"],
        "split": cfg.eval_split,
        "seq_len": held_out.shape[1],
        "stride": cfg.eval_stride,
        "token_sha256": token_hash(held_out),
        "recovered_ppl": None,
    }


def eval_job(cfg: JobConfig) -> dict[str, Any]:
    """Perplexity of `cfg.model` on `cfg.eval_num_samples` held-out windows of `cfg.dataset`, or, with
    `eval_tasks`, its lm-eval task scores."""
    check_device(cfg.device)
    check_tasks(cfg.eval_tasks, cfg.eval_tasks_include_path)
    t = time.perf_counter()
    model, tokenizer, _ = load(cfg)
    if cfg.device:
        model.to(cfg.device)
    elif torch.cuda.is_available():
        model.to("cuda")
    load_s = time.perf_counter() - t
    if cfg.eval_tasks:
        out = task_scores(cfg, model, tokenizer, "given", {})
        return {"model": cfg.model, **out, "load_s": load_s}
    blocks = held_out_samples(cfg, tokenizer, model)
    result = held_out_perplexity(cfg, model, blocks)
    return {
        "model": cfg.model,
        "dataset": {"name": cfg.dataset, "split": cfg.eval_split, "text_column": cfg.text_column},
        "seq_len": blocks.shape[1],
        "stride": cfg.eval_stride,
        "batch_size": cfg.eval_batch_size,
        "seed": cfg.seed,
        "token_sha256": token_hash(blocks),
        **result,
        "load_s": load_s,
    }
