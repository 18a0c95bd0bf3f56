"""The output checkpoint: save a pruned model so `from_pretrained` loads it as is, verify it, install it.

Everything is written into a temporary folder beside the target; the zero count of every target tensor
is re-read from the safetensors files through one small reused buffer (no second model copy) and
compared with the report; only a checkpoint that passes is renamed into place. A crash mid-save
therefore leaves no output (or the previous one), never a partial folder that loads: until verified,
the temporary folder's config.json is kept under another name, so `from_pretrained` refuses it.
On Linux an existing output is swapped for the new one atomically (renameat2 RENAME_EXCHANGE), so the
output path always holds a complete checkpoint. Leftovers of killed saves (`.<name>.partial-<pid>-*`)
are removed by the next save once their process is gone.
"""

from __future__ import annotations

import json
import os
import struct
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


def count_zeros(folder: str | Path, names, chunk_bytes: int = READ_CHUNK_BYTES) -> dict[str, int]:
    """Zero count of each named tensor in the folder's safetensors files. `names`: tensor names, or
    {name: (tensor, expert index or None)} to count one expert's slice of a 3-D tensor.

    Reads each tensor's bytes through one reused buffer of `chunk_bytes` instead of mapping the files,
    so verifying a checkpoint adds at most that buffer to resident memory, whatever the model's size
    (a memory map would leave every page it read resident until the file is closed)."""
    found: dict[str, int] = {}
    wanted = dict(names) if isinstance(names, dict) else {n: (n, None) for n in names}
    buf = bytearray(chunk_bytes)
    for path in safetensors_files(folder):
        with open(path, "rb", buffering=0) as fh:
            header, data_start = _read_header(fh)
            for name, (key, begin, end) in sorted(_regions(header, wanted).items(), key=lambda kv: kv[1][1]):
                dtype = SAFETENSORS_DTYPES.get(header[key]["dtype"])
                if dtype is None:
                    raise VerificationError(f"{key}: dtype {header[key]['dtype']} cannot be verified")
                step = max(len(buf) // dtype.itemsize, 1) * dtype.itemsize
                fh.seek(data_start + begin)
                zeros = 0
                for offset in range(begin, end, step):
                    n = min(step, end - offset)
                    view = memoryview(buf)[:n]
                    if fh.readinto(view) != n:
                        raise VerificationError(f"{path.name} ends inside tensor {key}")
                    zeros += int((torch.frombuffer(view, dtype=dtype) == 0).sum())
                found[name] = zeros
    missing = set(wanted) - set(found)
    if missing:
        raise VerificationError(
            f"{len(missing)} pruned tensors are missing from the checkpoint, e.g. {min(missing)}"
        )
    return found


def verify_zeros(
    folder: str | Path, per_tensor: dict[str, dict[str, int]], stored_as: dict[str, list] | None = None
) -> None:
    """Each matrix's zero count, re-read from the files; `stored_as` maps a matrix the model holds in
    another layout than it is written in to the file tensors (or expert slices) holding it."""
    stored_as = stored_as or {}
    pieces = {f"{n}\0{i}": tuple(p) for n, ps in stored_as.items() for i, p in enumerate(ps)}
    counts = count_zeros(folder, {**{n: (n, None) for n in per_tensor if n not in stored_as}, **pieces})
    found = {n: counts[n] for n in per_tensor if n not in stored_as}
    for name, ps in stored_as.items():
        found[name] = sum(counts[f"{name}\0{i}"] for i in range(len(ps)))
    for name, info in per_tensor.items():
        if found[name] != info["zeros"]:
            raise VerificationError(
                f"{name}: {found[name]} zeros written but the report says {info['zeros']}"
            )


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


def verify_report(folder: str | Path, report: Report | dict[str, Any]) -> None:
    """Zero counts (unstructured runs) or tensor shapes (structured runs) re-read from the files."""
    r = as_report(report)
    if r.structured:
        verify_shapes(folder, r.shrinking.tensor_shapes)
    else:
        verify_zeros(
            folder, {n: {"zeros": t.zeros} for n, t in r.sparsity.per_tensor.items()}, r.sparsity.stored_as
        )


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
) -> Path:
    """Write, verify and atomically install the checkpoint; returns its final path.

    `settings`: the run's flat settings, saved beside the weights as prune_config.yaml (so
    `--config prune_config.yaml` repeats the run) and shown in the card.
    `state_dict`: the full weights when the model itself holds only a shard (FSDP); default its own.
    `model_id`: what the card's loading snippet loads (the Hub repo the job pushes to; default the folder).
    """

    if report.get("per_tensor") and "stored_as" not in report:
        report["stored_as"] = stored_layout(model, list(report["per_tensor"])) or None

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes, state_dict=state_dict)
        # Until it is verified the folder must not load: its config.json waits under another name.
        os.rename(tmp / "config.json", tmp / PENDING_CONFIG)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        pause_point("output-write")
        (tmp / "prune_config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        verify_report(tmp, report)
        report["verified"] = True
        report["file_bytes"] = sum(f.stat().st_size for f in safetensors_files(tmp))
        report["plots"] = write_plots(report, tmp)
        write_json(tmp / "pruning_report.json", report)
        (tmp / "README.md").write_text(model_card(settings, report, model_id=model_id))
        os.rename(tmp / PENDING_CONFIG, tmp / "config.json")

    return write_folder(output_dir, fill)[0]


def read_report(folder: str | Path) -> dict[str, Any]:
    """The report of an llm-gradprune output folder (what `recover` and `push` start from)."""
    path = Path(folder) / "pruning_report.json"
    if not path.is_file():
        raise ConfigError(
            f"{str(folder)!r} is not an llm-gradprune output (no pruning_report.json): recover takes one"
        )
    return json.loads(path.read_text())


def tensor_shapes_of(model) -> dict[str, list[int]]:
    """Every tensor's shape in the model's state dict: what a structured run's checkpoint must hold."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}
