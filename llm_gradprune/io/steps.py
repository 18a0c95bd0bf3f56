"""Step folders: the numbered snapshots of one long computation, each on disk complete or not at all.

A state folder holds `step-<n>` folders (n zero-padded to 8 digits). `StepFolders.save` writes a step
into a `.tmp-step-<n>-*` folder inside the state folder, records every file's size in `state.json`
(written last), fsyncs the files and the folder, renames it to `step-<n>`, fsyncs the state folder,
and only then removes the older steps and `.tmp-*` leftovers. A kill at any moment therefore leaves
the previous complete step; `latest()` takes the newest step whose `state.json` parses, has this
version and whose files have the recorded sizes.

A saved step belongs to one run: its metadata holds that run's identity (config, model fingerprint,
hash of the text), and `refuse_other_run` names what differs when another run tries to continue it.
Used by the calibration state (io/calib_state.py) and the recovery state (recovery/state.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..faults import pause_point
from .atomic import fsync_dir, fsync_tree, swap_dirs

META = "state.json"


def step_of(path: Path) -> int | None:
    """n for a `step-<n>` folder, else None."""
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


class StepFolders:
    """The `step-<n>` folders of one state folder. `pause` names the fault-injection point (faults.py)
    inside every save: files written, not yet renamed; its count is the save's number in this process."""

    def __init__(self, folder: str | Path, version: int, pause: str):
        self.dir = Path(folder)
        self.version = version
        self.pause = pause
        self.saves = 0

    def save(self, step: int, write: Callable[[Path], dict[str, Any]]) -> Path:
        """`write(tmp)` puts the step's files (flat, no subfolders) into `tmp` and returns its metadata
        (JSON-able); `version` and `files` (name -> size) are added to it. Returns the step folder."""
        self.saves += 1
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.dir))
        meta = write(tmp)
        pause_point(self.pause, self.saves)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / META).write_text(json.dumps({"version": self.version, **meta, "files": files}, indent=1))
        fsync_tree(tmp)
        final = self.dir / name
        _install(tmp, final)
        fsync_dir(self.dir)
        for old in self.dir.iterdir():  # only now are the other steps redundant
            if old != final and (old.name.startswith(".tmp-") or step_of(old) is not None):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete step (folder, its metadata), or None; incomplete ones are skipped."""
        if not self.dir.is_dir():
            return None
        steps = sorted((p for p in self.dir.iterdir() if step_of(p) is not None), key=step_of, reverse=True)
        for folder in steps:
            meta = self._complete_meta(folder)
            if meta is not None:
                return folder, meta
        return None

    def to_resume(
        self, resume: bool, identity: dict[str, Any], text: str
    ) -> tuple[Path, dict[str, Any]] | None:
        """The newest step a resumed run continues (None when not resuming or nothing is saved); a step of
        another run (other settings, model or `text`) is refused in one line."""
        found = self.latest() if resume else None
        if found is not None:
            refuse_other_run(found[0], found[1]["identity"], identity, text)
        return found

    def _complete_meta(self, folder: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((folder / META).read_text())
            if meta.get("version") != self.version:
                return None
            if all((folder / f).stat().st_size == size for f, size in meta["files"].items()):
                return meta
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        return None

    def clear(self) -> None:
        """Remove the whole state folder (its work is safely elsewhere now)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _install(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. A `final` already there is a killed attempt's at the same step: it is
    exchanged atomically where the OS can, so a complete step stays in place at every moment."""
    if final.exists():
        if swap_dirs(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(final)
    os.rename(tmp, final)


# -- the run a step belongs to ------------------------------------------------------------------------
def describe_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """`key saved -> now` for every key whose value differs, in key order."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key, "<absent>") != now.get(key, "<absent>"):
            diffs.append(f"{key} {saved.get(key, '<absent>')!r} -> {now.get(key, '<absent>')!r}")
    return ", ".join(diffs)


def _identity_difference(saved: dict[str, Any], now: dict[str, Any], text: str) -> str:
    if saved.get("config") != now.get("config"):
        diff = describe_difference(saved.get("config") or {}, now.get("config") or {})
        return f"the config differs from the saved run ({diff})"
    if saved.get("model") != now.get("model"):
        return (
            f"the model's weights differ from the saved run "
            f"(fingerprint {str(saved.get('model'))[:12]} -> {str(now.get('model'))[:12]})"
        )
    if saved.get("data") != now.get("data"):
        return (
            f"the {text} differ from the saved run "
            f"(sha256 {str(saved.get('data'))[:12]} -> {str(now.get('data'))[:12]}): the data set changed"
        )
    return f"it belongs to another run ({describe_difference(saved, now)})"


def refuse_other_run(folder: Path, saved: dict[str, Any], now: dict[str, Any], text: str) -> None:
    """Raise ConfigError naming what differs when identity `now` is not the `saved` one of the step
    in `folder`; `text` names the hashed text ("calibration tokens", "training tokens")."""
    if saved == now:
        return
    hint = f"rerun with the saved run's settings, or delete {str(folder.parent)!r} to start over"
    raise ConfigError(f"cannot resume {str(folder)!r}: {_identity_difference(saved, now, text)}; {hint}")
