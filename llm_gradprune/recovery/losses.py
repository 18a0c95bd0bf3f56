"""Recovery losses: the LM loss, and distillation from the dense teacher's next-token distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) over the next-token distribution, mean over positions, times T^2.

    sum_v p_t(v) (log p_t(v) - log p_s(v)) with p = softmax(logits / T); the T^2 factor keeps the
    gradient's size independent of T (Hinton et al., 2015). Zero exactly when the two logits agree.
    Logits are [..., vocab]; the sums run in fp32 whatever their dtype.
    """
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * (t * t)


def lm_and_distill_loss(
    model, batch: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float, temperature: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - alpha) * next-token loss + alpha * KL(teacher || student) on the positions that predict a token."""
    out = model(input_ids=batch, labels=batch)
    parts = {"lm": float(out.loss.detach())}
    if teacher_logits is None or alpha == 0:
        return out.loss, parts
    kl = distill_kl(out.logits[:, :-1], teacher_logits[:, :-1].to(out.logits.device), temperature)
    parts["kl"] = float(kl.detach())
    return (1.0 - alpha) * out.loss + alpha * kl, parts
