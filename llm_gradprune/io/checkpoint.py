"""The output checkpoint: save a pruned model so `from_pretrained` loads it as is, verify it, install it.

Everything is written into a temporary folder beside the target; every tensor is re-read from the
safetensors files once, through one small reused buffer (no second model copy): the zero count of every
target tensor is compared with the report, a tensor holding NaN/inf is refused, and each tensor's sha256
is recorded in the report (`tensor_sha256`, which push checks again); only a checkpoint that passes is
renamed into place, with `manifest.json` (every file, its size and sha256) written last. A crash mid-save
therefore leaves no output (or the previous one), never a partial folder that loads: until verified,
the temporary folder's config.json is kept under another name, so `from_pretrained` refuses it.
On Linux an existing output is swapped for the new one atomically (renameat2 RENAME_EXCHANGE), so the
output path always holds a complete checkpoint. Leftovers of killed saves (`.<name>.partial-<pid>-*`)
are removed by the next save once their process is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ConfigError
from ..faults import pause_point
from ..report import Report, as_report
from .atomic import write_folder, write_json
from .card import model_card
from .layout import stored_layout
from .local_paths import read_local_record, restore_local, split_local, write_local_record
from .manifest import write_manifest
from .plots import write_plots


class VerificationError(RuntimeError):
    """The written checkpoint does not hold what the report says."""


def _writable_parent(out: Path) -> Path:
    """The nearest existing folder above `out`, which the save will create folders in."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_output_dir(output_dir: str | Path, overwrite: bool, inputs: dict[str, Any] | None = None) -> Path:
    """Refuse an output that would clobber something, or could not be written, before any work is done.
    `inputs`: {what: path} of the run's inputs (model, teacher, data...); none may be the output, hold it
    or lie inside it, with or without `overwrite` (replacing the output would delete it)."""
    out = Path(output_dir).expanduser().resolve()
    parent = _writable_parent(out)
    if not parent.is_dir():
        raise ConfigError(
            f"output_dir {str(output_dir)!r} cannot be created: {str(parent)!r} is not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir {str(output_dir)!r} cannot be written: no write permission in {str(parent)!r}"
        )
    check_not_an_input(output_dir, inputs or {})
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(output_dir)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir {str(output_dir)!r} is not empty: pass --overwrite to replace it")
    return out


def check_not_an_input(output_dir: str | Path, inputs: dict[str, Any]) -> None:
    """The output folder is replaced as a whole: refuse one that is, holds or lies inside an input (a
    local file or folder; symlinks resolved on both sides, so no alias of the input gets through)."""
    out = Path(output_dir).expanduser().resolve()
    for what, path in inputs.items():
        if not path or not Path(path).expanduser().exists():
            continue  # a Hub id or a built-in: nothing of it lies on this disk
        src = Path(path).expanduser().resolve()
        if out == src:
            raise ConfigError(
                f"output_dir {str(output_dir)!r} is the {what} {str(src)!r}: choose another output folder"
            )
        if src in out.parents:
            raise ConfigError(f"output_dir {str(output_dir)!r} is inside the {what} {str(src)!r}")
        if out in src.parents:
            raise ConfigError(
                f"output_dir {str(output_dir)!r} holds the {what} {str(src)!r}, which replacing the output would "
                "delete: choose another output folder"
            )


def safetensors_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VerificationError(f"no .safetensors file in {folder}")
    return files


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
READ_CHUNK_BYTES = 64 << 20


def _read_header(fh) -> tuple[dict, int]:
    (size,) = struct.unpack("<Q", fh.read(8))
    return json.loads(fh.read(size)), 8 + size


def _regions(header: dict, wanted: dict[str, tuple[str, int | None]]) -> dict[str, tuple[str, int, int]]:
    """{wanted name: (tensor key, first byte, end byte)} of what this file holds of them: a whole
    tensor, or one expert's slice of a fused expert tensor."""
    out = {}
    for name, (key, expert) in wanted.items():
        info = header.get(key)
        if info is None or key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if expert is not None:
            size = (end - begin) // info["shape"][0]
            begin, end = begin + expert * size, begin + (expert + 1) * size
        out[name] = (key, begin, end)
    return out


class NonFiniteError(VerificationError):
    """A tensor holds NaN or inf: such a checkpoint is never saved, nor pushed."""


def _nonfinite(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    if t.dtype.itemsize == 1:  # fp8: no CPU isfinite kernel; converted a few MiB at a time
        return sum(_nonfinite(part.float()) for part in t.split(1 << 22))
    if torch.isfinite(t.sum()):  # NaN and inf carry into the sum: one cheap reduction when all is well
        return 0
    return t.numel() - int(torch.isfinite(t).sum())  # exact (also a finite sum that overflowed)


@dataclass
class Scan:
    """What one read of a folder's safetensors files found: zeros of the regions asked for, the sha256
    of every tensor's bytes as written (keyed as in the files), and the first tensor holding NaN/inf."""

    zeros: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    nonfinite: tuple[str, int, int] | None = None  # (tensor, NaN/inf values, values)


def _scan_tensor(fh, path: Path, start: int, key: str, info: dict, regions: list, buf: bytearray):
    """(sha256, NaN/inf count, {region: zeros}) of one tensor, read through `buf` from its first byte."""
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None and regions:
        raise VerificationError(f"{key}: dtype {info['dtype']} cannot be verified")
    size = dtype.itemsize if dtype is not None else 1
    begin, end = info["data_offsets"]
    step = max(len(buf) // size, 1) * size
    digest, bad, zeros = hashlib.sha256(), 0, {name: 0 for name, _, _ in regions}
    fh.seek(start + begin)
    for offset in range(begin, end, step):
        n = min(step, end - offset)
        view = memoryview(buf)[:n]
        if fh.readinto(view) != n:
            raise VerificationError(f"{path.name} ends inside tensor {key}")
        digest.update(view)
        if dtype is None:
            continue
        t = torch.frombuffer(view, dtype=dtype)
        bad += _nonfinite(t)
        for name, lo, hi in regions:  # the parts of the asked regions this chunk holds
            lo, hi = max(lo, offset) - offset, min(hi, offset + n) - offset
            if lo < hi:
                zeros[name] += int((t[lo // size : hi // size] == 0).sum())
    return digest.hexdigest(), bad, zeros


def scan_files(folder: str | Path, names=(), chunk_bytes: int = READ_CHUNK_BYTES) -> Scan:
    """One read of every tensor in the folder's safetensors files, in file order, through one reused
    buffer of `chunk_bytes` instead of mapping the files, so verifying a checkpoint adds at most that
    buffer to resident memory, whatever the model's size (a memory map would leave every page it read
    resident until the file is closed). `names`: tensor names whose zeros to count, or {name: (tensor,
    expert index or None)} to count one expert's slice of a 3-D tensor."""
    wanted = dict(names) if isinstance(names, dict) else {n: (n, None) for n in names}
    scan, buf = Scan(), bytearray(chunk_bytes)
    for path in safetensors_files(folder):
        with open(path, "rb", buffering=0) as fh:
            header, data_start = _read_header(fh)
            regions: dict[str, list] = {}
            for name, (key, begin, end) in _regions(header, wanted).items():
                regions.setdefault(key, []).append((name, begin, end))
            tensors = sorted(
                (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
            )
            for key in tensors:
                digest, bad, zeros = _scan_tensor(
                    fh, path, data_start, key, header[key], regions.get(key, []), buf
                )
                scan.sha256[key] = digest
                scan.zeros.update(zeros)
                if bad and scan.nonfinite is None:
                    scan.nonfinite = (key, bad, int(torch.Size(header[key]["shape"]).numel()))
    missing = set(wanted) - set(scan.zeros)
    if missing:
        raise VerificationError(
            f"{len(missing)} pruned tensors are missing from the checkpoint, e.g. {min(missing)}"
        )
    return scan


def check_finite(scan: Scan) -> Scan:
    """The scan, unless a tensor holds NaN/inf (first in file order): checked before the zero counts,
    which a diverged model breaks too."""
    if scan.nonfinite is not None:
        key, bad, numel = scan.nonfinite
        raise NonFiniteError(
            f"{key} holds {bad:,} NaN/inf values of {numel:,}: a checkpoint with non-finite weights is refused"
        )
    return scan


def count_zeros(folder: str | Path, names, chunk_bytes: int = READ_CHUNK_BYTES) -> dict[str, int]:
    """Zero count of each named tensor in the folder's safetensors files (see `scan_files`)."""
    return scan_files(folder, names, chunk_bytes).zeros


def verify_zeros(
    folder: str | Path, per_tensor: dict[str, dict[str, int]], stored_as: dict[str, list] | None = None
) -> Scan:
    """Each matrix's zero count, re-read from the files; `stored_as` maps a matrix the model holds in
    another layout than it is written in to the file tensors (or expert slices) holding it."""
    stored_as = stored_as or {}
    pieces = {f"{n}\0{i}": tuple(p) for n, ps in stored_as.items() for i, p in enumerate(ps)}
    scan = check_finite(
        scan_files(folder, {**{n: (n, None) for n in per_tensor if n not in stored_as}, **pieces})
    )
    counts = scan.zeros
    found = {n: counts[n] for n in per_tensor if n not in stored_as}
    for name, ps in stored_as.items():
        found[name] = sum(counts[f"{name}\0{i}"] for i in range(len(ps)))
    for name, info in per_tensor.items():
        if found[name] != info["zeros"]:
            raise VerificationError(
                f"{name}: {found[name]} zeros written but the report says {info['zeros']}"
            )
    return scan


def tensor_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Every tensor's shape in the folder's safetensors files, from the headers only."""
    shapes: dict[str, list[int]] = {}
    for path in safetensors_files(folder):
        with open(path, "rb", buffering=0) as fh:
            header, _ = _read_header(fh)
        shapes.update({k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def verify_shapes(folder: str | Path, expected: dict[str, list[int]]) -> None:
    """A structured run's checkpoint: every tensor written has the shape the report records (tied
    weights that save_pretrained leaves out are not required)."""
    for name, shape in tensor_shapes(folder).items():
        if name not in expected:
            raise VerificationError(f"{name} is in the checkpoint but not in the report")
        if list(expected[name]) != shape:
            raise VerificationError(f"{name} has shape {shape} written but the report says {expected[name]}")


def verify_report(folder: str | Path, report: Report | dict[str, Any]) -> dict[str, str]:
    """Zero counts (unstructured runs) or tensor shapes (structured runs) re-read from the files, no
    NaN/inf anywhere, and each tensor's sha256 equal to the report's `tensor_sha256` where it has one
    (a report saved before it had none). Returns {file tensor: sha256}, what save_pruned records."""
    r = as_report(report)
    if r.structured:
        verify_shapes(folder, r.shrinking.tensor_shapes)
        scan = check_finite(scan_files(folder))
    else:
        scan = verify_zeros(
            folder, {n: {"zeros": t.zeros} for n, t in r.sparsity.per_tensor.items()}, r.sparsity.stored_as
        )
    recorded = (
        report.get("tensor_sha256")
        if isinstance(report, dict)
        else getattr(r.sparsity, "tensor_sha256", None)
    )
    if recorded is not None:
        changed = sorted(k for k in {*recorded, *scan.sha256} if recorded.get(k) != scan.sha256.get(k))
        if changed:
            key = changed[0]
            how = ("is missing from the checkpoint" if key not in scan.sha256 else "is not in the report's tensor_sha256"
                   if key not in recorded else "was changed after saving: its sha256 differs from the report's")  # fmt: skip
            raise VerificationError(f"{key} {how} ({len(changed)} tensors differ)")
    return scan.sha256


PENDING_CONFIG = "config.json.unverified"


def save_pruned(
    model,
    tokenizer,
    report: dict[str, Any],
    output_dir: str | Path,
    *,
    settings: dict[str, Any],
    max_shard_bytes: int = 5 * 10**9,
    state_dict: dict | None = None,
    model_id: str | None = None,
    weights_writer=None,
) -> Path:
    """Write, verify and atomically install the checkpoint; returns its final path.

    `settings`: the run's flat settings, saved beside the weights as prune_config.yaml (so
    `--config prune_config.yaml` repeats the run, given the model and text) and shown in the card.
    Local paths in the settings and the report are written by their last part (the report's full ones
    go to the local record, see io/local_paths); `manifest.json`, written last, lists every file.
    `state_dict`: the full weights when the model itself holds only a shard (FSDP); default its own.
    `model_id`: what the card's loading snippet loads (the Hub repo the job pushes to; default the folder).
    A tensor holding NaN/inf is refused in one line (ConfigError) and nothing is installed.
    `weights_writer(folder)`: writes the weights and config instead of `save_pretrained` (offload disk:
    the pruned blocks were written while the run went on).
    """

    if report.get("per_tensor") and "stored_as" not in report:
        report["stored_as"] = stored_layout(model, list(report["per_tensor"])) or None
    shown_settings, _ = split_local(settings)

    def fill(tmp: Path) -> None:
        if weights_writer is not None:
            weights_writer(tmp)
        else:
            model.save_pretrained(tmp, max_shard_size=max_shard_bytes, state_dict=state_dict)
        # Until it is verified the folder must not load: its config.json waits under another name.
        os.rename(tmp / "config.json", tmp / PENDING_CONFIG)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        pause_point("output-write")
        (tmp / "prune_config.yaml").write_text(yaml.safe_dump(shown_settings, sort_keys=False))
        report.pop("tensor_sha256", None)  # a recovered folder's old hashes: these weights are new
        report["tensor_sha256"] = verify_report(tmp, report)
        report["verified"] = True
        report["file_bytes"] = sum(f.stat().st_size for f in safetensors_files(tmp))
        report["plots"] = write_plots(report, tmp)
        shown, local = split_local(report)
        write_json(tmp / "pruning_report.json", shown)
        write_local_record(tmp, local)
        (tmp / "README.md").write_text(model_card(shown_settings, shown, model_id=model_id))
        os.rename(tmp / PENDING_CONFIG, tmp / "config.json")
        write_manifest(tmp)

    try:
        return write_folder(output_dir, fill)[0]
    except NonFiniteError as err:
        raise ConfigError(f"checkpoint not saved: {err}; nothing was written to the output folder") from None


def read_report(folder: str | Path) -> dict[str, Any]:
    """The report of an llm-gradprune output folder (what `recover` and `push` start from), with the
    local paths this machine's local record keeps put back."""
    path = Path(folder) / "pruning_report.json"
    if not path.is_file():
        raise ConfigError(
            f"{str(folder)!r} is not an llm-gradprune output (no pruning_report.json): recover takes one"
        )
    return restore_local(json.loads(path.read_text()), read_local_record(Path(folder)))


def tensor_shapes_of(model) -> dict[str, list[int]]:
    """Every tensor's shape as the checkpoint files hold it (`io.layout.stored_shapes`): what a structured
    run's checkpoint must hold."""
    from .layout import stored_shapes

    return stored_shapes(model)
