"""Checks made when a run is planned, before the model is loaded: nothing fails after the compute."""

from __future__ import annotations

import platform

import torch

from .. import __version__
from ..errors import ConfigError


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import safetensors
    import transformers

    return {
        "llm_gradprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "safetensors": safetensors.__version__,
    }


def check_device(device: str | None) -> None:
    """A forced device must exist here: say so in one line instead of torch's assertion."""
    if device is None or device == "cpu":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {device!r} is not a device name: use cpu, cuda, cuda:1, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} is not available: this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} is not available: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None)
        if backend is None or not backend.is_available():
            raise ConfigError(f"device {device!r} is not available on this machine")


def quiet_hf_progress_bars() -> None:
    """--no-progress also silences the bars transformers and datasets draw while loading."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def weight_bytes(model) -> int:
    """Bytes of the model's distinct parameters and buffers that a checkpoint stores (tied ones once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())
