"""Masked recovery training: retrain what pruning cost, keeping every pruned weight exactly zero.

One loop (Accelerate's backward, so several processes train data-parallel): AdamW with a linear warm-up
and a cosine decay, gradient accumulation, optional bf16 autocast and activation recompute. The
gradient at pruned positions is zeroed before every step, so AdamW's moments there stay 0 and so does
its update (the classic recipe pruned inside its AdamW loop, whose momentum regrew the zeros), and the
masks are re-applied after every step; N:M patterns therefore stay valid. The loss is the next-token
loss, optionally mixed with KL(teacher || student) from the dense model (`distill_alpha`). With
`lora_r` only rank-r adapters train, and they are merged back through the mask at the end. Weights
held in bf16/fp16 train through fp32 master copies (AdamW's moments and updates in fp32, the model's
copy rounded from them after each step): at recovery learning rates most single updates are smaller
than half a bf16 step and would otherwise be rounded away.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.loop import to_device
from ..evaluate import perplexity
from ..parallel import Collective, collective_for
from ..status import set_stage
from ..targets import find_targets
from .config import RecoverConfig
from .losses import lm_and_distill_loss
from .masking import apply_masks_, mask_grads_, merge_lora_through_mask_, pruned_masks


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear from 1/warmup to 1, then cosine down to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor


def _autocast(device: torch.device, cfg: RecoverConfig):
    use = cfg.bf16 if cfg.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(use)), bool(use)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def fp32_masters(trained: dict[str, torch.Tensor], local=None) -> dict[str, torch.Tensor] | None:
    """fp32 copies of the trained tensors (this rank's rows when sharded), or None when they already
    are fp32 (or wider): the optimizer then steps the model's own tensors."""
    if not any(p.dtype in LOW_PRECISION for p in trained.values()):
        return None
    return {n: (local(p) if local else p.data).detach().to(torch.float32).clone() for n, p in trained.items()}


@torch.no_grad()
def _grads_to_masters(trained: dict[str, torch.Tensor], masters: dict[str, torch.Tensor], local=None) -> None:
    for n, m in masters.items():
        g = trained[n].grad
        m.grad = None if g is None else (local(g) if local else g).to(torch.float32)
        trained[n].grad = None


@torch.no_grad()
def _masters_to_model(trained: dict[str, torch.Tensor], masters: dict[str, torch.Tensor], local=None) -> None:
    for n, m in masters.items():
        (local(trained[n]) if local else trained[n].data).copy_(m)


def _lora(model: nn.Module, targets: dict[str, nn.Module], cfg: RecoverConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError(
            "recover lora_r needs peft, which is not installed: pip install 'llm-gradprune[lora]'"
        ) from None
    pattern = "|".join(re.escape(n) for n in targets)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=0.0, bias="none",
                      target_modules=f"^({pattern})$")  # fmt: skip
    return get_peft_model(model, lcfg)


def recover_(
    model: nn.Module,
    batches: list[torch.Tensor],
    cfg: RecoverConfig,
    *,
    teacher: nn.Module | None = None,
    eval_blocks: torch.Tensor | None = None,
    accelerator=None,
    state=None,
    targets: dict[str, nn.Module] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    steps: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` for `steps` (default cfg.steps) optimizer steps on `batches` (this rank's micro-
    batches, used in order, cycling). Returns (the trained model, the recovery report). `masks` (True =
    pruned) default to the target weights' zeros now; `state` (recovery.state.RecoverState) saves and
    resumes. With LoRA the returned model is the base model with the adapters merged through the mask."""
    steps = cfg.steps if steps is None else steps
    coll: Collective = collective_for(model)
    targets = targets if targets is not None else find_targets(model)
    weights = {f"{n}.weight": m.weight for n, m in targets.items()}
    local = (lambda t: coll.local(t)) if coll.rows_sharded else None
    masks = (
        masks
        if masks is not None
        else pruned_masks({n: local(w) if local else w for n, w in weights.items()})
    )
    pruned_before = {n: int(m.sum()) for n, m in masks.items()}
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora_r:
        model = _lora(model, targets, cfg)
        trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for p in trained.values():
            p.requires_grad_(True)
    else:
        trained = weights
        for p in trained.values():
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    masters = fp32_masters(trained, local)
    stepped = masters if masters is not None else trained  # what the optimizer updates
    optimizer = torch.optim.AdamW(
        list(stepped.values()), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    warmup = max(1, round(cfg.warmup * steps)) if cfg.warmup else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup))
    wrapped = model
    if accelerator is not None and accelerator.num_processes > 1 and not coll.rows_sharded:
        wrapped = accelerator.prepare_model(model)  # DDP: gradients averaged across ranks
    start_step, log = (state.restore({n: t.data for n, t in stepped.items()}, optimizer, scheduler)
                       if state is not None else (0, []))  # fmt: skip
    if masters is not None and start_step:
        _masters_to_model(trained, masters, local)
    autocast, bf16 = _autocast(device, cfg)
    main = (accelerator is None or accelerator.is_main_process) and coll.rank == 0
    evaluates = eval_blocks is not None and (coll.rows_sharded or main)

    def held_out() -> float:
        model.eval()
        ppl = perplexity(model, eval_blocks[: cfg.eval_windows], batch_size=4, progress=False, device=device)[
            "ppl"
        ]
        model.train()
        return ppl

    teacher_device = torch.device("cpu") if cfg.teacher_device == "cpu" else device
    if teacher is not None:
        teacher.to(teacher_device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    t0 = time.perf_counter()
    tokens = 0
    model.train()
    bar = tqdm(total=steps, initial=start_step, desc="recovery", unit="step", disable=not (progress and main))
    try:
        if start_step == 0 and evaluates:
            log.append({"step": 0, "ppl": held_out()})
        for step in range(start_step, steps):
            set_stage(f"recovery training, step {step + 1} of {steps}")
            parts: dict[str, float] = {}
            for i in range(cfg.grad_accum):
                batch = to_device(batches[(step * cfg.grad_accum + i) % len(batches)], device)
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=batch.to(teacher_device)).logits
                with autocast:
                    loss, got = lm_and_distill_loss(
                        wrapped, batch, teacher_logits, cfg.distill_alpha, cfg.temperature
                    )
                scaled = loss / cfg.grad_accum
                accelerator.backward(scaled) if accelerator is not None else scaled.backward()
                for k, v in got.items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
                tokens += batch.numel()
            if not cfg.lora_r:
                mask_grads_(trained, masks, local)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(trained.values()), cfg.max_grad_norm)
            if masters is not None:
                _grads_to_masters(trained, masters, local)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not cfg.lora_r:
                apply_masks_(stepped, masks, None if masters is not None else local)
            if masters is not None:
                _masters_to_model(trained, masters, local)
            entry = {"step": step + 1, "loss": parts["lm"] if "kl" not in parts else
                     (1 - cfg.distill_alpha) * parts["lm"] + cfg.distill_alpha * parts["kl"], **parts,
                     "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / (time.perf_counter() - t0)}  # fmt: skip
            if evaluates and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
                entry["ppl"] = held_out()
            log.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            if state is not None and state.due(step + 1) and step + 1 < steps:
                state.save(step + 1, {n: t.data for n, t in stepped.items()}, optimizer, scheduler, log)
    finally:
        bar.close()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        for p in trained.values():
            p.requires_grad_(False)
            p.grad = None
        model.eval()
    if cfg.lora_r:
        model = merge_lora_through_mask_(model, masks)
    weights = {f"{n}.weight": m.weight for n, m in find_targets(model).items()} if cfg.lora_r else weights
    final_ppl = held_out() if evaluates else None
    if final_ppl is not None:
        log.append({"step": steps, "ppl": final_ppl})
    still_zero = sum(int(((local(w) if local else w) == 0)[masks[n]].sum()) for n, w in weights.items())
    report = {
        "steps": steps, "tokens": tokens * (coll.processes if not coll.rows_sharded else 1),
        "resumed_from_step": state.resumed_from if state is not None else 0,
        "seconds": time.perf_counter() - t0, "lr": cfg.lr, "warmup_steps": warmup, "schedule": "linear warm-up + cosine",
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "bf16": bf16,
        "master_weights": "fp32" if masters is not None else None,
        "gradient_checkpointing": cfg.gradient_checkpointing, "distill_alpha": cfg.distill_alpha,
        "temperature": cfg.temperature, "lora_r": cfg.lora_r, "trained_tensors": len(trained),
        "trained_weights": sum(p.numel() for p in trained.values()),
        "pruned_kept_zero": still_zero == sum(pruned_before.values()),
        "final_loss": next((e["loss"] for e in reversed(log) if "loss" in e), None),
        "held_out_ppl": final_ppl, "log": log,
    }  # fmt: skip
    return model, report
