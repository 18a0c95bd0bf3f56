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
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.loop import to_device
from ..errors import ConfigError
from ..evaluate import perplexity
from ..parallel import Collective, all_reduce_scalars, collective_for
from ..status import set_stage
from ..targets import Target, as_targets, find_targets, target_params
from .config import RecoverConfig, check_lora_rank
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


def check_lora_targets(targets: dict[str, Target], lora_r: int) -> None:
    """LoRA adapters attach to nn.Linear modules, at a rank no wider than the layer: refused, when the
    run is planned, for other targets or a wider rank."""
    other = (
        next((t for t in targets.values() if not isinstance(t.module, nn.Linear)), None) if lora_r else None
    )
    if other is not None:
        raise ConfigError(
            f"recover lora_r adds LoRA adapters to nn.Linear layers, and {other.name} is not one "
            f"({type(other.module).__name__}): train the weights themselves (lora_r 0)"
        )
    if lora_r:
        check_lora_rank(lora_r, {t.name: min(t.weight.shape) for t in targets.values()})


def _lora(model: nn.Module, targets: dict[str, Target], cfg: RecoverConfig):
    check_lora_targets(targets, cfg.lora_r)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(
            "recover lora_r needs peft, which is not installed: pip install 'llm-gradprune[lora]'"
        ) from None
    pattern = "|".join(re.escape(n) for n in targets)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=0.0, bias="none",
                      target_modules=f"^({pattern})$")  # fmt: skip
    return get_peft_model(model, lcfg)


@dataclass
class TrainingParts:
    """What one recovery run trains and with what: built by `setup_training`, stepped by `train_step`."""

    model: nn.Module  # the model trained (with LoRA: the peft model holding the adapters)
    forward: nn.Module  # what runs the batches: the model, or its DDP wrapper
    weights: dict[str, torch.Tensor]  # the target weights, by name
    trained: dict[str, torch.Tensor]  # what gets gradients: the target weights, or the adapters
    masters: dict[str, torch.Tensor] | None  # fp32 copies of `trained` when it is held in bf16/fp16
    masks: dict[str, torch.Tensor]  # True = pruned, by weight name (this rank's rows when sharded)
    local: Callable[[torch.Tensor], torch.Tensor] | None  # this rank's rows of a tensor (row shards)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    warmup: int  # warm-up steps
    device: torch.device
    collective: Collective
    accelerator: Any
    autocast: Any  # the bf16 autocast context (disabled when bf16 is off)
    bf16: bool
    teacher: nn.Module | None
    teacher_device: torch.device

    @property
    def stepped(self) -> dict[str, torch.Tensor]:
        """What the optimizer updates: the fp32 masters, or the trained tensors themselves."""
        return self.masters if self.masters is not None else self.trained


def _make_trainable(model: nn.Module, targets: dict[str, nn.Module], cfg: RecoverConfig):
    """(the model to train, its trained tensors): every parameter frozen but the target weights, or
    with `lora_r` but the adapters LoRA adds to them."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora_r:
        model = _lora(model, targets, cfg)
        trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    else:
        trained = target_params(targets)
    for p in trained.values():
        p.requires_grad_(True)
    return model, trained


def _optimizer(stepped: dict[str, torch.Tensor], cfg: RecoverConfig, steps: int):
    """(AdamW, its warm-up + cosine schedule, warm-up steps)."""
    optimizer = torch.optim.AdamW(
        list(stepped.values()), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    warmup = max(1, round(cfg.warmup * steps)) if cfg.warmup else 0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup)), warmup


def setup_training(
    model: nn.Module,
    cfg: RecoverConfig,
    steps: int,
    *,
    targets: dict[str, nn.Module] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    accelerator=None,
    teacher: nn.Module | None = None,
) -> TrainingParts:
    """Targets and masks, the trained tensors (weights or LoRA adapters), activation recompute, fp32
    masters, the optimizer and schedule, and the DDP wrapper where ranks hold whole replicas."""
    coll: Collective = collective_for(model)
    targets = as_targets(model, targets) if targets is not None else find_targets(model)
    # trained and masked per parameter: a fused expert parameter is one tensor to the optimizer
    weights = target_params(targets)
    local = (lambda t: coll.local(t)) if coll.rows_sharded else None
    if masks is None:
        masks = pruned_masks({n: local(w) if local else w for n, w in weights.items()})
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    model, trained = _make_trainable(model, targets, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    masters = fp32_masters(trained, local)
    optimizer, scheduler, warmup = _optimizer(masters if masters is not None else trained, cfg, steps)
    forward = model
    if accelerator is not None and accelerator.num_processes > 1 and not coll.rows_sharded:
        forward = accelerator.prepare_model(model)  # DDP: gradients averaged across ranks
    autocast, bf16 = _autocast(device, cfg)
    teacher_device = torch.device("cpu") if cfg.teacher_device == "cpu" else device
    return TrainingParts(model, forward, weights, trained, masters, masks, local, optimizer, scheduler,
                         warmup, device, coll, accelerator, autocast, bf16, teacher, teacher_device)  # fmt: skip


def _resume(parts: TrainingParts, state) -> tuple[int, list[dict[str, Any]]]:
    """(the step to start at, the log so far): a saved state's, or a fresh start's."""
    if state is None:
        return 0, []
    stepped = parts.stepped
    start_step, log = state.restore({n: t.data for n, t in stepped.items()}, parts.optimizer, parts.scheduler)
    if parts.masters is not None and start_step:
        _masters_to_model(parts.trained, parts.masters, parts.local)
    return start_step, log


def _prepare_teacher(parts: TrainingParts) -> None:
    if parts.teacher is not None:
        parts.teacher.to(parts.teacher_device).eval()
        for p in parts.teacher.parameters():
            p.requires_grad_(False)


def _held_out_ppl(model: nn.Module, held_out: torch.Tensor, cfg: RecoverConfig, device) -> float:
    """Perplexity on the first `eval_windows` held-out token blocks; leaves the model in training mode."""
    model.eval()
    ppl = perplexity(model, held_out[: cfg.eval_windows], batch_size=4, progress=False, device=device)["ppl"]
    model.train()
    return ppl


def _backward(parts: TrainingParts, batch: torch.Tensor, cfg: RecoverConfig) -> dict[str, float]:
    """One micro-batch's forward and backward (its loss scaled for accumulation); its loss parts."""
    teacher_logits = None
    if parts.teacher is not None:
        with torch.no_grad():
            teacher_logits = parts.teacher(input_ids=batch.to(parts.teacher_device)).logits
    with parts.autocast:
        loss, got = lm_and_distill_loss(
            parts.forward, batch, teacher_logits, cfg.distill_alpha, cfg.temperature
        )
    scaled = loss / cfg.grad_accum
    parts.accelerator.backward(scaled) if parts.accelerator is not None else scaled.backward()
    return got


def _optimizer_step(parts: TrainingParts, cfg: RecoverConfig) -> None:
    """Mask, clip and apply the accumulated gradients; pruned weights stay exactly zero."""
    trained, masters, local = parts.trained, parts.masters, parts.local
    if not cfg.lora_r:
        mask_grads_(trained, parts.masks, local)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(trained.values()), cfg.max_grad_norm)
    if masters is not None:
        _grads_to_masters(trained, masters, local)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if not cfg.lora_r:
        apply_masks_(parts.stepped, parts.masks, None if masters is not None else local)
    if masters is not None:
        _masters_to_model(trained, masters, local)


def _tokens_of_steps(batches: list[torch.Tensor], cfg: RecoverConfig, steps: int) -> int:
    """Tokens the first `steps` optimizer steps train on (micro-batches are taken in order, cycling)."""
    return sum(batches[i % len(batches)].numel() for i in range(steps * cfg.grad_accum)) if batches else 0


def train_step(
    parts: TrainingParts, batches: list[torch.Tensor], step: int, cfg: RecoverConfig
) -> tuple[dict[str, float], int]:
    """Optimizer step `step` (from 0) over its `grad_accum` micro-batches, taken from `batches` in order,
    cycling. Returns (the loss parts, each the mean over the micro-batches; the tokens trained on)."""
    losses: dict[str, float] = {}
    tokens = 0
    for i in range(cfg.grad_accum):
        batch = to_device(batches[(step * cfg.grad_accum + i) % len(batches)], parts.device)
        for k, v in _backward(parts, batch, cfg).items():
            losses[k] = losses.get(k, 0.0) + v / cfg.grad_accum
        tokens += batch.numel()
    _optimizer_step(parts, cfg)
    return losses, tokens


class TrainingDiverged(ConfigError):
    """The loss or a trained weight stopped being finite: the run stops rather than save a broken model."""


def _nonfinite(parts: TrainingParts, losses: dict[str, float], weights: bool) -> str | None:
    """What is not finite after a step (a loss part, else with `weights` a trained tensor), or None; one
    rank's finding stops every rank, so no rank waits in a collective for one that left."""
    found = next((f"the {k} loss is {v}" for k, v in losses.items() if not math.isfinite(v)), None)
    if found is None and weights:
        local = parts.local
        found = next((f"{n} holds non-finite values" for n, t in parts.trained.items()
                      if not torch.isfinite(local(t) if local else t.data).all()), None)  # fmt: skip
    if parts.collective.processes > 1 and all_reduce_scalars([float(found is not None)], "max")[0]:
        found = found or "another process's loss or weights are not finite"
    return found


def _stop_if_nonfinite(parts: TrainingParts, losses: dict[str, float], cfg: RecoverConfig, step: int, steps: int,
                       *, weights: bool, state) -> None:  # fmt: skip
    """Raise TrainingDiverged naming `step` when the loss or (with `weights`) a trained weight is not
    finite; a training state saved before it stays on disk."""
    found = _nonfinite(parts, losses, weights)
    if found is None:
        return
    saved = state.saved() if state is not None else None
    kept = f"; the training state of step {saved[1]} is kept in {str(saved[0])!r}" if saved else ""
    raise TrainingDiverged(
        f"recovery training stopped at step {step} of {steps}: {found}; no checkpoint was written{kept} "
        f"(lower recover_lr, now {cfg.lr:g})"
    )


def _log_entry(
    step: int, losses: dict[str, float], cfg: RecoverConfig, lr: float, tokens_per_s: float
) -> dict[str, Any]:
    """One step's log line; `loss` is what was minimised: the next-token loss, mixed with KL when distilling."""
    loss = losses["lm"]
    if "kl" in losses:
        loss = (1 - cfg.distill_alpha) * losses["lm"] + cfg.distill_alpha * losses["kl"]
    return {"step": step, "loss": loss, **losses, "lr": lr, "tokens_per_s": tokens_per_s}


def _train(
    parts: TrainingParts,
    batches: list[torch.Tensor],
    cfg: RecoverConfig,
    steps: int,
    start_step: int,
    log: list[dict[str, Any]],
    *,
    score_held_out: Callable[[nn.Module], float] | None,
    state,
    bar,
    t0: float,
) -> int:
    """Steps `start_step`..`steps`, appending to `log` (and held-out perplexities every `eval_every`),
    saving the state when due. Returns the tokens trained on."""
    tokens = 0
    if start_step == 0 and score_held_out is not None:
        log.append({"step": 0, "ppl": score_held_out(parts.model)})
    for step in range(start_step, steps):
        set_stage(f"recovery training, step {step + 1} of {steps}")
        losses, n = train_step(parts, batches, step, cfg)
        saves = state is not None and state.due(step + 1) and step + 1 < steps
        # the weights are checked where they are kept (a state, the end): a step's loss sees the last one's
        _stop_if_nonfinite(
            parts, losses, cfg, step + 1, steps, weights=saves or step + 1 == steps, state=state
        )
        tokens += n
        entry = _log_entry(step + 1, losses, cfg, parts.scheduler.get_last_lr()[0],
                           tokens / (time.perf_counter() - t0))  # fmt: skip
        if (
            score_held_out is not None
            and cfg.eval_every
            and (step + 1) % cfg.eval_every == 0
            and step + 1 < steps
        ):
            entry["ppl"] = score_held_out(parts.model)
        log.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")
        if saves:
            state.save(
                step + 1, {n: t.data for n, t in parts.stepped.items()}, parts.optimizer, parts.scheduler, log
            )
    return tokens


def _end_training(parts: TrainingParts, cfg: RecoverConfig) -> None:
    if cfg.gradient_checkpointing:
        parts.model.gradient_checkpointing_disable()
    for p in parts.trained.values():
        p.requires_grad_(False)
        p.grad = None
    parts.model.eval()


def _merged(parts: TrainingParts, cfg: RecoverConfig) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the trained model, its target weights): with LoRA the base model, adapters merged through the mask."""
    if not cfg.lora_r:
        return parts.model, parts.weights
    model = merge_lora_through_mask_(parts.model, parts.masks)
    return model, target_params(find_targets(model))


def _report(parts: TrainingParts, cfg: RecoverConfig, *, steps: int, tokens: int, state, seconds: float,
            kept_zero: bool, final_ppl: float | None, log: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    coll, trained = parts.collective, parts.trained
    return {
        "steps": steps, "tokens": tokens * (coll.processes if not coll.rows_sharded else 1),
        "resumed_from_step": state.resumed_from if state is not None else 0,
        "seconds": seconds, "lr": cfg.lr, "warmup_steps": parts.warmup, "schedule": "linear warm-up + cosine",
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "bf16": parts.bf16,
        "master_weights": "fp32" if parts.masters is not None else None,
        "gradient_checkpointing": cfg.gradient_checkpointing, "distill_alpha": cfg.distill_alpha,
        "temperature": cfg.temperature, "lora_r": cfg.lora_r, "trained_tensors": len(trained),
        "trained_weights": sum(p.numel() for p in trained.values()),
        "pruned_kept_zero": kept_zero,
        "final_loss": next((e["loss"] for e in reversed(log) if "loss" in e), None),
        "held_out_ppl": final_ppl, "log": log,
    }  # fmt: skip


def recover_(
    model: nn.Module,
    batches: list[torch.Tensor],
    cfg: RecoverConfig,
    *,
    teacher: nn.Module | None = None,
    held_out: torch.Tensor | None = None,
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
    parts = setup_training(model, cfg, steps, targets=targets, masks=masks, accelerator=accelerator,
                           teacher=teacher)  # fmt: skip
    pruned_before = sum(int(m.sum()) for m in parts.masks.values())
    start_step, log = _resume(parts, state)
    main = (accelerator is None or accelerator.is_main_process) and parts.collective.rank == 0
    evaluates = held_out is not None and (parts.collective.rows_sharded or main)
    score_held_out = (
        partial(_held_out_ppl, held_out=held_out, cfg=cfg, device=parts.device) if evaluates else None
    )
    _prepare_teacher(parts)
    t0 = time.perf_counter()
    parts.model.train()
    bar = tqdm(total=steps, initial=start_step, desc="recovery", unit="step", disable=not (progress and main))
    try:
        # a resumed run also trained on the steps before the resume: the report counts them too
        tokens = _tokens_of_steps(batches, cfg, start_step) + _train(
            parts,
            batches,
            cfg,
            steps,
            start_step,
            log,
            score_held_out=score_held_out,
            state=state,
            bar=bar,
            t0=t0,
        )
    finally:
        bar.close()
        _end_training(parts, cfg)
    model, weights = _merged(parts, cfg)
    final_ppl = score_held_out(model) if score_held_out is not None else None
    if final_ppl is not None:
        log.append({"step": steps, "ppl": final_ppl})
    local = parts.local
    still_zero = sum(int(((local(w) if local else w) == 0)[parts.masks[n]].sum()) for n, w in weights.items())
    report = _report(parts, cfg, steps=steps, tokens=tokens, state=state, seconds=time.perf_counter() - t0,
                     kept_zero=still_zero == pruned_before, final_ppl=final_ppl, log=log)  # fmt: skip
    return model, report
