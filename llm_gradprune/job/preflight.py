"""Checks made when a run is planned, before the model is loaded: nothing fails after the compute."""

from __future__ import annotations

import errno
import importlib.metadata
import math
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

from .. import __version__
from ..errors import ConfigError


def versions() -> dict[str, str]:
    import accelerate
    import safetensors
    import transformers

    return {
        "llm_gradprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        # read from the package metadata, not imported: 81 MiB a local-text run never uses
        "datasets": importlib.metadata.version("datasets"),
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
    """--no-progress also silences the bars transformers and datasets draw while loading (datasets only
    once a Hub source imports it: its environment switch is read then)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"


def weight_bytes(model) -> int:
    """Bytes of the model's distinct parameters and buffers that a checkpoint stores (tied ones once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


SPACE_MARGIN = 1.05  # the card, report, tokenizer and plots beside the weights, and file system slack
SPACE_SLACK_BYTES = 32 << 20
SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def folder_weight_bytes(folder: str | Path, dtype: str) -> int | None:
    """Bytes the weights of a local safetensors model take at `dtype` (floating tensors are converted
    on load), from the file headers alone; None where the folder holds none (a Hub id, .bin files)."""
    from safetensors import safe_open

    files = sorted(Path(folder).expanduser().glob("*.safetensors"))
    if not files:
        return None
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = 0
    for path in files:
        with safe_open(path, "pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                kind = piece.get_dtype()
                item = size if kind.startswith(("F", "BF")) else _STORED_BYTES.get(kind, 8)
                total += math.prod(piece.get_shape()) * item
    return total


_STORED_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_free_space(output_dir: str | Path, weights: int | None, what: str) -> None:
    """Refuse a run whose checkpoint clearly cannot fit where it goes, before the compute: the new
    checkpoint is written in full beside the output before any old one is removed."""
    if not weights:
        return
    out = Path(output_dir).expanduser().resolve()
    folder = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(folder).free
    need = int(weights * SPACE_MARGIN) + SPACE_SLACK_BYTES
    if free < need:
        raise ConfigError(
            f"output_dir {str(output_dir)!r} has {_size(free)} free in {str(folder)!r}, but the checkpoint needs "
            f"about {_size(need)} ({what}): free some space or choose another output folder"
        )


def space_error(err: BaseException) -> str | None:
    """'no space left on device' where `err` says the disk or the quota is full (an OSError, or the
    same error as safetensors reports it from Rust, `... (os error 28)`); else None."""
    if isinstance(err, OSError) and err.errno in SPACE_ERRNOS:
        return SPACE_ERRNOS[err.errno]
    found = re.search(r"\(os error (\d+)\)", str(err))
    return SPACE_ERRNOS.get(int(found.group(1))) if found else None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
