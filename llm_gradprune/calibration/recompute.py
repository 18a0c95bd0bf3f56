"""Activation (gradient) checkpointing for calibration, with transformers' own implementation.

Checkpointed layers keep only their inputs in the forward pass and recompute the rest during backward:
activation memory drops from every intermediate of every layer to one hidden state per layer, for
about one extra forward pass of time. Two details matter for pruning calibration:

- the embeddings are frozen (no weight before the first layer needs a gradient), so the first layer's
  input would not require grad and a reentrant checkpoint would then drop every gradient inside it:
  `enable_input_require_grads()` makes the embedding output require grad;
- transformers checkpoints a layer only when `layer.training` is set, while calibration runs the model
  in eval mode (no dropout). Only the checkpointed layer objects' own flags are set, not their
  children's, so attention and MLP dropout stay off.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> tuple[Callable[[], None], int]:
    """Turn checkpointing on for calibration (call after `model.eval()`): (function undoing it, layers)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        GradientCheckpointingLayer = None  # noqa: N806
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.enable_input_require_grads()
    layers = [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False)
        and (isinstance(m, GradientCheckpointingLayer) if GradientCheckpointingLayer else m is not model)
    ]
    if not layers:
        raise ValueError(f"gradient_checkpointing: no checkpointable layer found in {type(model).__name__}")
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True

    def undo() -> None:
        for m, flag in zip(layers, flags, strict=True):
            m.training = flag
        disable = (
            getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        )
        disable()
        model.disable_input_require_grads()

    return undo, len(layers)
