"""The recovery training state: trained tensors, optimizer and schedule saved every N steps, atomically,
so a killed run resumes with the same result (bit-identical on the CPU)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..faults import pause_point
from ..io.stats_files import read_tensor_shards, write_tensor_shards

STATE_VERSION = 1


def _step_of(path: Path) -> int | None:
    return int(path.name[5:]) if path.name.startswith("step-") and path.name[5:].isdigit() else None


class RecoverState:
    """Saves and restores one recovery run; `recover_(..., state=)` drives it."""

    def __init__(self, folder: str | Path, every: int, resume: bool, identity: dict[str, Any]):
        self.dir, self.every, self.resume, self.identity = Path(folder), every, resume, identity
        self.saves = 0
        self.resumed_from = 0
        found = self.latest() if resume else None
        if found is not None and found[1]["identity"] != identity:
            raise ConfigError(
                f"cannot resume {str(found[0])!r}: it belongs to another recovery run (other settings, model or "
                f"text); delete {str(self.dir)!r} to start over"
            )
        self._found = found

    def latest(self) -> tuple[Path, dict] | None:
        if not self.dir.is_dir():
            return None
        for folder in sorted(
            (p for p in self.dir.iterdir() if _step_of(p) is not None), key=_step_of, reverse=True
        ):
            try:
                meta = json.loads((folder / "state.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("version") == STATE_VERSION:
                return folder, meta
        return None

    def restore(self, tensors: dict[str, torch.Tensor], optimizer, scheduler) -> tuple[int, list]:
        """Load the newest state into the live objects: (steps done, training log so far)."""
        if self._found is None:
            return 0, []
        folder, meta = self._found
        read_tensor_shards(folder, meta["files"], tensors)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
        self.resumed_from = meta["step"]
        print(f"[llm-gradprune] resuming recovery from {folder} (step {self.resumed_from})", flush=True)
        return meta["step"], meta["log"]

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, tensors: dict[str, torch.Tensor], optimizer, scheduler, log: list) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=self.dir))
        files = write_tensor_shards(tmp, tensors)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(torch.get_rng_state(), tmp / "rng.pt")
        meta = {"version": STATE_VERSION, "step": step, "files": files, "scheduler": scheduler.state_dict(),
                "log": log, "identity": self.identity}  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(meta))
        pause_point("recover-save", self.saves + 1)
        final = self.dir / f"step-{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        self.saves += 1
        for old in self.dir.iterdir():  # only now is the previous state redundant
            if old != final and (old.name.startswith(".tmp-") or _step_of(old) is not None):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
