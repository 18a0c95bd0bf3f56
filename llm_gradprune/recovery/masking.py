"""Keeping pruned weights exactly zero while training: gradients masked, masks re-applied, LoRA merged
through the mask (its delta dropped at pruned positions)."""

from __future__ import annotations

import torch
from torch import nn


def pruned_masks(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """True where a target weight is exactly zero now: the positions training must keep at zero."""
    return {n: (w.detach() == 0) for n, w in weights.items()}


@torch.no_grad()
def mask_grads_(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], local=None) -> None:
    """Zero the gradient at pruned positions, so AdamW's moments there stay 0 and its update is 0."""
    for name, p in params.items():
        if p.grad is not None:
            g = local(p.grad) if local is not None else p.grad
            g.masked_fill_(masks[name], 0)


@torch.no_grad()
def apply_masks_(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], local=None) -> None:
    """Re-zero pruned positions after each step (the gradient mask already keeps them at 0; this also
    covers anything an optimizer does on its own, e.g. a coupled weight decay)."""
    for name, p in params.items():
        w = local(p) if local is not None else p.data
        w.masked_fill_(masks[name], 0)


@torch.no_grad()
def merge_lora_through_mask_(peft_model, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Fold every LoRA adapter into its base weight as W + delta * (1 - mask), then remove the adapters.

    `masks` are keyed by the base model's weight names (`model.layers.0.mlp.up_proj.weight`). The zero
    set of every target is unchanged: a merged delta at a pruned position is dropped, not rounded.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in list(module.lora_A):
            delta = module.get_delta_weight(adapter)
            weight = module.get_base_layer().weight
            key = f"{name}.weight"
            weight.add_(delta.to(weight.dtype).masked_fill(masks[key].to(delta.device), 0))
    return peft_model.unload()
