"""The manifest of an output folder: every file the tool wrote there, with its size and sha256, written
last at save time (after verification) as `manifest.json`, and checked again before a push.

A push sends the manifest's files (and the manifest) and nothing else: a file someone added to the
folder (a `.env`, notes, a symlink to a system file) is never picked up by accident. Dotfiles are never
listed and never sent (the folder's `.llm-gradprune-local.json` keeps the run's local paths for this
machine only); a symlink anywhere in the folder is refused, never followed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MANIFEST = "manifest.json"
HASH_CHUNK_BYTES = 16 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def folder_entries(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(regular files, symlinks and other non-files, dot entries) under `folder`, as sorted relative
    posix paths. Dot entries are not descended into and symlinks are never followed."""
    files, odd, dots = [], [], []
    for root, dirs, names in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        for name in sorted(dirs):
            path = (rel / name).as_posix()
            if name.startswith("."):
                dots.append(path)
            elif os.path.islink(Path(root) / name):
                odd.append(path)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not os.path.islink(Path(root) / d)]
        for name in names:
            path = (rel / name).as_posix()
            mode = os.lstat(Path(root) / name).st_mode
            (dots if name.startswith(".") else files if stat.S_ISREG(mode) else odd).append(path)
    return sorted(files), sorted(odd), sorted(dots)


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """List every file now in `folder` (a fresh output: all of them the tool's) in `manifest.json`."""
    folder = Path(folder)
    files, odd, _ = folder_entries(folder)
    if odd:
        raise RuntimeError(f"{odd[0]} in a fresh output folder is not a regular file")
    listed = {
        rel: {"bytes": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
        for rel in files
        if rel != MANIFEST
    }
    manifest = {"format": 1, "files": listed}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: Path, label: str) -> dict[str, dict[str, Any]] | None:
    """The manifest's {file: {bytes, sha256}}, None when the folder has none; one line when unreadable."""
    path = folder / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        ok = all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v) for v in files.values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ConfigError(f"{label!r}: {MANIFEST} is not a manifest llm-gradprune wrote: run prune again")
    return files


def plan_files(folder: Path, label: str, allow_extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a push of `folder` may send: {"files": the manifest's files, the manifest and the extras
    named, "skipped": the dot entries, never sent}. Refuses (one line) a symlink or special file, a file
    the manifest does not list unless `allow_extra` names it, and a folder without a manifest unless
    `allow_extra` names every file to send. Sizes and hashes are compared by `check_unchanged`."""
    files, odd, dots = folder_entries(folder)
    if odd:
        raise ConfigError(
            f"{label!r}: {odd[0]} is a symlink or not a regular file: push never follows links; "
            "copy the file in, or remove it"
        )
    extra = list(dict.fromkeys(str(x) for x in allow_extra))
    for name in extra:
        if Path(name).is_absolute() or any(p.startswith(".") for p in Path(name).parts) or "\\" in name:
            raise ConfigError(
                f"--allow-extra {name!r}: give a file inside the folder, not a dotfile or path out"
            )
        if Path(name).as_posix() not in files:
            raise ConfigError(f"--allow-extra {name!r} is not a regular file in {label!r}")
    extra = [Path(n).as_posix() for n in extra]
    manifest = read_manifest(folder, label)
    if manifest is None:
        if not extra:
            raise ConfigError(
                f"{label!r} has no {MANIFEST} (saved before llm-gradprune wrote one): run prune again, "
                "or name every file to send with --allow-extra FILE..."
            )
        return {"files": sorted(extra), "skipped": dots, "manifest": None}
    missing = [f for f in manifest if f not in files]  # also a name that would lead out of the folder
    if missing:
        raise ConfigError(f"{label!r}: {missing[0]}, listed in {MANIFEST}, is missing: run prune again")
    unknown = [f for f in files if f not in manifest and f != MANIFEST and f not in extra]
    if unknown:
        raise ConfigError(
            f"{label!r}: {unknown[0]} was not written by llm-gradprune (not in {MANIFEST}): remove it, "
            f"or send it too with --allow-extra {unknown[0]}"
        )
    sent = list(dict.fromkeys([*manifest, MANIFEST, *extra]))
    return {"files": sorted(sent), "skipped": dots, "manifest": manifest}


def check_unchanged(folder: Path, label: str, manifest: dict[str, dict[str, Any]]) -> None:
    """Every file of the manifest is there with the size and sha256 it was saved with."""
    for rel, want in manifest.items():  # plan_files found each as a regular file inside the folder
        path = folder / rel
        if path.stat().st_size != want["bytes"] or file_sha256(path) != want["sha256"]:
            raise ConfigError(
                f"{label!r}: {rel} changed since it was saved (its size or sha256 differs from {MANIFEST}): "
                "refusing to push it; run prune again"
            )
