"""Atomic outputs: write a folder beside its target, then swap it in, so a reader never sees half of one.

On Linux an existing output is swapped for the new one atomically (renameat2 RENAME_EXCHANGE), so the
output path always holds a complete folder. Leftovers of killed saves (`.<name>.partial-<pid>-*`,
`.<name>.old-<pid>`) are removed by the next save once their process is gone. Folders are created with
the permissions the umask gives, as `save_pretrained` would (mkdtemp alone makes them 0700).

One run per output: `claim_output` takes `.<name>.lock` beside it (O_EXCL; pid, host, start, command)
when the run is planned, `release_output` drops it however the run ends. A lock whose pid is dead on
this host is stale (a killed run): reported and replaced.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..faults import pause_point

log = logging.getLogger("llm_gradprune")


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


# -- the output lock: one run per output folder ------------------------------------------------------
def lock_path(out: Path) -> Path:
    """`.<name>.lock` beside the output: on the same file system, so runs on other hosts see it too."""
    return out.parent / f".{out.name}.lock"


def claim_output(out: Path, command: str) -> Path:
    """Take the exclusive lock on the output folder `out` for this run (ConfigError while another run
    holds it); a lock whose run is gone (its pid is dead on this host) is reported and replaced, so a
    killed run never blocks the next. Parents of `out` are created here, as the save would; give the
    returned lock to `release_output`."""
    out = Path(out)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(out)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command, "created": [str(p) for p in created]}  # fmt: skip
    for _ in range(3):  # a stale lock taken away by another run between our two looks: look again
        before = out.parent.stat().st_mtime_ns
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and not _is_stale(holder):
                raise ConfigError(_held_message(out, lock, holder)) from None
            if holder is not None and _take_stale(lock, holder):
                log.warning("note: stale lock %s of a run that is gone (pid %s, started %s) replaced",
                            lock, holder.get("pid"), holder.get("started"))  # fmt: skip
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({**info, "parent_mtime_ns": [before, out.parent.stat().st_mtime_ns]}, fh)
        return lock
    raise ConfigError(f"output_dir {str(out)!r} is being claimed by another run at the same time ({lock})")


def release_output(lock: Path | None) -> None:
    """Drop this run's lock (only if it is still ours), and the empty parents `claim_output` created.
    A run that wrote nothing beside the lock leaves its parent's mtime as it found it: a refused run
    leaves no trace."""
    holder = _read_lock(lock) if lock is not None else None
    if holder is None or holder.get("pid") != os.getpid() or holder.get("host") != socket.gethostname():
        return
    try:  # never in the way of the error that ends the run
        parent = lock.parent.stat()
        lock.unlink(missing_ok=True)
        before, after = holder.get("parent_mtime_ns", [None, None])
        if parent.st_mtime_ns == after and before is not None:  # the run left nothing else there: no trace
            os.utime(lock.parent, ns=(parent.st_atime_ns, before))
    except OSError:
        return
    for folder in holder.get("created", []):  # deepest first, as listed; a folder now in use stays
        try:
            os.rmdir(folder)
        except OSError:
            break


def _read_lock(lock: Path) -> dict | None:
    """The lock's record; {} when it cannot be read (being written right now, or damaged); None if gone."""
    try:
        record = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _is_stale(holder: dict) -> bool:
    """Only a run on this host can be checked: its pid is gone. A lock of another host is respected."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _take_stale(lock: Path, holder: dict) -> bool:
    """Move the stale lock away (atomically, so two new runs cannot both take it); put it back if what
    was moved is not the stale record any more (another run replaced it in between)."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    if _read_lock(aside) != holder:
        try:
            os.link(aside, lock)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _held_message(out: Path, lock: Path, holder: dict) -> str:
    if not holder:
        return (f"output_dir {str(out)!r} is locked by another run ({lock} cannot be read): wait for it, or delete "
                "the lock if no run writes there")  # fmt: skip
    command = str(holder.get("command", ""))
    command = command if len(command) <= 80 else command[:77] + "..."
    return (f"output_dir {str(out)!r} is being written by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}, started {holder.get('started')}: {command}): wait for it to end, or choose "
            f"another output folder (lock: {lock})")  # fmt: skip
