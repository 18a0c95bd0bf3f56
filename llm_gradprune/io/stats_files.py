"""Calibration statistics on disk: fp32 sums in safetensors shards of bounded size, plus their counters.

Used by the calibration state (resume, io/calib_state.py) and by `save_statistics`/`load_statistics`,
which keep one calibration pass to prune many times from (a sweep over criteria, scopes or sparsities:
`prune_(model, batches, cfg, statistics=load_statistics(folder, targets))`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..calibration.stats import Statistics, make_statistics
from ..errors import ConfigError

SHARD_BYTES = 1 << 30
STATISTICS_VERSION = 1


def write_tensor_files(
    folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES
) -> dict[str, int]:
    """Write `tensors` as stats-NNNNN.safetensors files of at most `shard_bytes`; {file name: size}."""
    files: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        fname = f"stats-{len(files):05d}.safetensors"
        save_file(shard, str(folder / fname))
        files[fname] = (folder / fname).stat().st_size
        shard, size = {}, 0

    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[key] = t.detach().to("cpu", copy=True).contiguous()  # a copy: never alias live sums
        size += nbytes
    flush()
    return files


def read_tensor_files(
    folder: Path, files, targets: dict[str, torch.Tensor], extra_prefix: str = "rng."
) -> dict:
    """Copy every saved tensor into its target; tensors named `extra_prefix...` are returned instead."""
    extra: dict[str, torch.Tensor] = {}
    want = set(targets)
    for fname in files:
        with safe_open(str(folder / fname), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith(extra_prefix):
                    extra[key] = fh.get_tensor(key)
                elif key in targets:
                    targets[key].copy_(fh.get_tensor(key))
                    want.discard(key)
                else:
                    raise ConfigError(f"saved statistics {str(folder)!r} hold an unexpected tensor {key!r}")
    if want:
        raise ConfigError(f"saved statistics {str(folder)!r} lack {len(want)} tensors, e.g. {min(want)!r}")
    return extra


def accumulator_counters(stats: Statistics) -> dict[str, Any]:
    return {k: v for acc in stats.accumulators() for k, v in acc.counters().items()}


def save_statistics(folder: str | Path, stats: Statistics) -> Path:
    """Write one pass's statistics (sums, per-tensor counts, the pass's counters) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = write_tensor_files(folder, {k: t for a in stats.accumulators() for k, t in a.tensors().items()})
    meta = {"version": STATISTICS_VERSION, "needs": sorted(stats.needs), "files": files,
            "counters": accumulator_counters(stats), "pass": stats.counters}  # fmt: skip
    (folder / "statistics.json").write_text(json.dumps(meta, indent=1, default=str))
    return folder


def load_statistics(folder: str | Path, modules: dict[str, nn.Module]) -> Statistics:
    """The statistics `save_statistics` wrote, for these target modules (same names and shapes)."""
    folder = Path(folder)
    meta_path = folder / "statistics.json"
    if not meta_path.is_file():
        raise ConfigError(f"{str(folder)!r} holds no saved statistics (no statistics.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != STATISTICS_VERSION:
        raise ConfigError(
            f"saved statistics {str(folder)!r} have version {meta.get('version')}, not {STATISTICS_VERSION}"
        )
    stats = make_statistics(set(meta["needs"]), modules)
    read_tensor_files(
        folder, meta["files"], {k: t for a in stats.accumulators() for k, t in a.tensors().items()}
    )
    for acc in stats.accumulators():
        acc.load_counters({k: meta["counters"][k] for k in acc.counters()})
    stats.counters = dict(meta["pass"])
    return stats
