"""Atomic outputs: write a folder beside its target, then swap it in, so a reader never sees half of one.

On Linux an existing output is swapped for the new one atomically (renameat2 RENAME_EXCHANGE), so the
output path always holds a complete folder. Leftovers of killed saves (`.<name>.partial-<pid>-*`,
`.<name>.old-<pid>`) are removed by the next save once their process is gone. Folders are created with
the permissions the umask gives, as `save_pretrained` would (mkdtemp alone makes them 0700).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..faults import pause_point


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode the umask allows (0666 / 0777 minus it):
    some writers create files 0600 (safetensors' weights files here), which would hide a checkpoint
    from the other users of a shared machine."""
    mask = current_umask()
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def make_partial_dir(out: Path) -> Path:
    """A fresh hidden folder beside `out` (same file system, so it can be renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fsync_tree(folder: Path) -> None:
    """Flush every file directly in `folder`, then the folder's entries, to disk (before a rename
    makes them visible: otherwise a crash can leave the new name over empty files)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_dirs(a: Path, b: Path) -> bool:
    """Atomically exchange two folders (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def install(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`. An old `out` is swapped out atomically where the OS can (so `out` is always
    the old or the new checkpoint), else moved aside first; either way it is removed only after."""
    if out.exists() and swap_dirs(tmp, out):
        fsync_dir(out.parent)
        pause_point("output-install")
        return  # `tmp` now holds the old output; the caller removes it
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        pause_point("output-install")
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(out_dir: str | Path, fill: Callable[[Path], Any]) -> tuple[Path, Any]:
    """The one way an output folder is made: `fill(tmp)` writes (and checks) everything into a fresh
    folder beside `out_dir`; only if it returns is that folder given the umask's modes, synced and
    installed at `out_dir`. Whatever it raises leaves `out_dir` as it was. Returns (the final path,
    what `fill` returned)."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(out)
    tmp = make_partial_dir(out)
    try:
        result = fill(tmp)
        honour_umask(tmp)
        fsync_tree(tmp)
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_leftovers(out: Path) -> list[Path]:
    """Remove `.partial-<pid>-*` / `.old-<pid>` folders beside `out` left by killed saves (dead pids)."""
    removed = []
    for p in out.parent.glob(f".{out.name}.*"):
        rest = p.name[len(out.name) + 2 :]
        kind, _, tail = rest.partition("-")
        pid = tail.split("-", 1)[0]
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
