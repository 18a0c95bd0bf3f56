"""What any safetensors checkpoint holds: sparsity, N:M validity and all-zero rows/columns, per tensor.

Works on any checkpoint (ours, a Wanda or SparseGPT output, a dense model): a folder, one .safetensors
file, or a Hub id (only the index and the shards are downloaded). Each tensor is read in chunks of rows,
and each chunk through its own `safe_open`, so the file's memory map is dropped after every chunk:
resident memory grows by a few chunks (`CHUNK_BYTES`) plus one flag per column, whatever the size of
the model or of its largest tensor (a memory map kept open would keep every page it read resident).
On a 512 MiB checkpoint in 4 shards whose largest tensor is 64 MiB, peak RSS grew by 21-49 MiB.

For a 2-D tensor [rows, cols] (a linear weight: [out, in]) the input dimension is the last one: the
N:M check takes groups of M consecutive weights along each row and counts those holding more than N
non-zeros ("violating groups"); a width that is not a multiple of M is "not applicable" (None). Rows
and columns whose every weight is zero are what structured pruning could remove without any loss.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, hub_unreachable, unreachable
from .checkpoint import SAFETENSORS_DTYPES

PATTERNS = ((2, 4), (4, 8))
CHUNK_BYTES = 8 << 20
INDEX_GLOB = "*.safetensors.index.json"


def pattern_name(n: int, m: int) -> str:
    return f"{n}:{m}"


@dataclass
class TensorStats:
    """One tensor's counts. `zero_rows`, `zero_cols` and `violating` are None unless it is 2-D;
    `violating[p]` is None where the width is not a multiple of the pattern's M."""

    name: str
    file: str
    dtype: str
    shape: list[int]
    numel: int
    bytes: int
    zeros: int | None = None
    zero_rows: int | None = None
    zero_cols: int | None = None
    violating: dict[str, int | None] = field(default_factory=dict)

    @property
    def sparsity(self) -> float | None:
        return None if self.zeros is None else (self.zeros / self.numel if self.numel else 0.0)

    def valid(self, pattern: str) -> bool | None:
        bad = self.violating.get(pattern)
        return None if bad is None else bad == 0

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("file", "dtype", "shape", "bytes", "numel", "zeros")}
        out["sparsity"] = self.sparsity
        out.update(zero_rows=self.zero_rows, zero_cols=self.zero_cols)
        for p in (pattern_name(n, m) for n, m in PATTERNS):
            out[p] = self.valid(p)
        out["violating_groups"] = dict(self.violating)
        return out


def fold_chunks(stats: TensorStats, chunks: Iterable[torch.Tensor]) -> TensorStats:
    """Fill `stats` from the tensor's consecutive chunks along dim 0 (pure: no files)."""
    matrix = len(stats.shape) == 2
    cols = stats.shape[1] if matrix else 0
    zeros, zero_rows = 0, 0
    col_used = torch.zeros(cols, dtype=torch.uint8)
    groups = [(n, m) for n, m in PATTERNS if matrix and cols % m == 0]
    violating = {pattern_name(n, m): 0 for n, m in groups}
    buf = torch.empty(0, dtype=torch.bool)
    for chunk in chunks:
        if chunk.dtype.itemsize == 1 and chunk.is_floating_point():
            chunk = chunk.float()  # fp8: no CPU comparison kernels; the chunk is small
        if buf.numel() < chunk.numel():  # one flag buffer per tensor, not one allocation per chunk
            buf = torch.empty(chunk.numel(), dtype=torch.bool)
        used = torch.ne(chunk, 0, out=buf[: chunk.numel()].view(chunk.shape)).view(torch.uint8)
        zeros += chunk.numel() - int(used.sum(dtype=torch.int64 if used.numel() >> 31 else torch.int32))
        if matrix:
            zero_rows += int((used.amax(dim=1) == 0).sum())
            torch.maximum(col_used, used.amax(dim=0), out=col_used)
            clean_2_4 = False
            for n, m in groups:
                if (n, m) == (4, 8) and clean_2_4:
                    continue  # each aligned group of 8 is two groups of 4 holding at most 2 each
                bad = int((used.reshape(-1, m).sum(dim=1, dtype=torch.uint8) > n).sum())
                violating[pattern_name(n, m)] += bad
                clean_2_4 = (n, m) == (2, 4) and bad == 0
        del chunk, used  # before the next chunk is read, not after
    stats.zeros = zeros
    if matrix:
        stats.zero_rows, stats.zero_cols = zero_rows, cols - int(col_used.sum())
        stats.violating = {pattern_name(n, m): violating.get(pattern_name(n, m)) for n, m in PATTERNS}
    return stats


def _row_chunks(path: Path, name: str, shape: list[int], itemsize: int) -> Iterator[torch.Tensor]:
    from safetensors import safe_open

    if not shape:
        with safe_open(path, "pt") as f:
            yield f.get_tensor(name).reshape(1)
        return
    row_bytes = itemsize * max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        # a fresh handle per chunk: closing it unmaps the file, so the pages read do not stay resident
        with safe_open(path, "pt") as f:
            yield f.get_slice(name)[start : start + step]


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks followed, lies under `root` (also symlinks resolved)."""
    return root.resolve() in path.resolve().parents


def shard_paths(path: Path, weight_map: Any, label: str, index: str, root: Path | None = None) -> list[Path]:
    """The files an index's weight_map names, each refused in one line unless it lies in the folder
    (`root`, default `path`: a Hub snapshot's files are links into its cache folder): an absolute path,
    a `..` or a symlink out would read a file the checkpoint does not hold."""
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{index} in {label!r} is not a safetensors index")
    files = []
    for name in sorted({str(v) for v in weight_map.values()}):
        target = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not inside(root or path, target):
            raise ConfigError(
                f"{label!r}: {index} names {name!r}, which lies outside the checkpoint folder: refusing to read it"
            )
        files.append(target)
    return files


def checkpoint_files(path: Path, label: str, root: Path | None = None) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors file;
    each must lie in the folder (`root`, default `path`), symlinks followed."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"{label!r} is not a .safetensors file or a checkpoint folder")
        return [path]
    if not path.is_dir():
        raise ConfigError(
            f"{label!r} does not exist: give a checkpoint folder, a .safetensors file or a Hub id"
        )
    indexes = sorted(path.glob(INDEX_GLOB))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{indexes[0].name} in {label!r} is not a safetensors index") from None
        files = shard_paths(path, weight_map, label, indexes[0].name, root)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{label!r}: {indexes[0].name} names {missing[0]}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{label!r} holds no .safetensors file: it is not a safetensors checkpoint")
    out = [f.name for f in files if not inside(root or path, f)]
    if out:
        raise ConfigError(
            f"{label!r}: {out[0]} is a symlink out of the checkpoint folder: refusing to read it"
        )
    return files


def _headers(files: list[Path], label: str) -> list[TensorStats]:
    from safetensors import safe_open

    found = []
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    dtype, shape = s.get_dtype(), list(s.get_shape())
                    numel = int(torch.Size(shape).numel())
                    known = SAFETENSORS_DTYPES.get(dtype)
                    size = numel * known.itemsize if known is not None else 0
                    found.append(TensorStats(name, path.name, dtype, shape, numel, size))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a bad file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"{label!r}: {path.name} is not a readable safetensors file ({first})"
            ) from None
    return sorted(found, key=lambda t: _natural(t.name))


def inspect_files(files: list[Path], label: str) -> list[TensorStats]:
    """Every tensor's counts, one chunk in memory at a time. Tensors of a dtype torch cannot read keep
    zeros None (their size is unknown too)."""
    tensors = _headers(files, label)
    folder = {f.name: f for f in files}
    # One thread: each chunk's reductions are short and memory-bound; on a shared 2-core machine two
    # threads took 5.4 s for SmolLM2-135M where one took 1.1 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in tensors:
            dtype = SAFETENSORS_DTYPES.get(t.dtype)
            if dtype is not None:
                fold_chunks(t, _row_chunks(folder[t.file], t.name, t.shape, dtype.itemsize))
    finally:
        torch.set_num_threads(before)
    return tensors


def summarize(tensors: list[TensorStats]) -> dict[str, Any]:
    """Totals over all tensors, over the 2-D ones, and which 2-D tensors satisfy each N:M pattern."""
    counted = [t for t in tensors if t.zeros is not None]
    mats = [t for t in counted if len(t.shape) == 2]
    weights, zeros = sum(t.numel for t in counted), sum(t.zeros for t in counted)
    mat_weights, mat_zeros = sum(t.numel for t in mats), sum(t.zeros for t in mats)
    patterns = {}
    for n, m in PATTERNS:
        p = pattern_name(n, m)
        checked = [t for t in mats if t.valid(p) is not None]
        patterns[p] = {"checked": len(checked), "valid_tensors": [t.name for t in checked if t.valid(p)]}
    return {
        "tensors": len(tensors),
        "bytes": sum(t.bytes for t in tensors),
        "weights": weights,
        "zeros": zeros,
        "sparsity": zeros / weights if weights else 0.0,
        "matrices": len(mats),
        "matrix_weights": mat_weights,
        "matrix_zeros": mat_zeros,
        "matrix_sparsity": mat_zeros / mat_weights if mat_weights else 0.0,
        "patterns": patterns,
        "zero_rows": sum(t.zero_rows for t in mats),
        "zero_cols": sum(t.zero_cols for t in mats),
        "tensors_with_zero_rows": sum(1 for t in mats if t.zero_rows),
        "tensors_with_zero_cols": sum(1 for t in mats if t.zero_cols),
        "empty_tensors": [t.name for t in counted if t.numel and t.zeros == t.numel],
        "unreadable_tensors": [t.name for t in tensors if t.zeros is None],
    }


def looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".safetensors")


def _hub_download(repo_id: str, revision: str | None) -> Path:
    """The index (if any) first, then exactly the shards it names (a repo may also hold a consolidated
    copy of the same weights); without an index, every top-level .safetensors file."""
    from huggingface_hub import snapshot_download

    quiet = logging.getLogger("huggingface_hub._snapshot_download")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "no files matched" is expected when the repo has no index
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[INDEX_GLOB]))
    finally:
        quiet.setLevel(level)
    indexes = sorted(folder.glob(INDEX_GLOB))
    if indexes:
        try:
            shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"model {repo_id!r}: {indexes[0].name} is not a safetensors index") from None
        patterns = [indexes[0].name, *shards]
    else:
        patterns = ["*.safetensors"]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def resolve_checkpoint(name: str, revision: str | None = None) -> Path:
    """A local path as is; anything else that is a valid Hub id is downloaded (shards and index only)."""
    path = Path(name).expanduser()
    if path.exists() or looks_local(name):
        return path
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(
            f"{name!r} does not exist: give a checkpoint folder, a .safetensors file or a Hub id"
        ) from None
    try:
        return _hub_download(name, revision)
    except RevisionNotFoundError:
        raise ConfigError(f"model {name!r} has no revision {revision!r} on the Hub") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"model {name!r} is not on the Hub (or is private or gated: log in with a token that can read it)"
        ) from None
    except Exception as err:  # noqa: BLE001 - sorted below: unreachable, an HTTP answer, or a real bug
        if unreachable(err):
            raise ConfigError(hub_unreachable("model", name)) from None
        if isinstance(err, HfHubHTTPError):
            status = err.response.status_code if err.response is not None else "?"
            raise ConfigError(f"model {name!r}: the Hub answered HTTP {status}") from None
        raise


def inspect_checkpoint(name: str, revision: str | None = None) -> dict[str, Any]:
    """The whole inspection of a folder, .safetensors file or Hub id, as one JSON-ready dict."""
    path = resolve_checkpoint(str(name), revision)
    local = Path(str(name)).expanduser().exists() or looks_local(str(name))
    # a Hub snapshot's files link into its repo's cache folder (snapshots/<revision>/ -> blobs/)
    files = checkpoint_files(path, str(name), root=None if local else path.parent.parent)
    tensors = inspect_files(files, str(name))
    return {
        "source": str(name),
        "path": str(path),
        "files": [f.name for f in files],
        **summarize(tensors),
        "per_tensor": {t.name: t.as_dict() for t in tensors},
    }
