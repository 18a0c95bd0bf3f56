"""The recovery training state: trained tensors, optimizer and schedule saved every N steps, atomically,
so a killed run resumes with the same result (bit-identical on the CPU).

A state is a `step-<steps done>` folder (io/steps.py) holding the trained tensors (`stats-*.safetensors`,
the shard format of io/stats_files.py), `optimizer.pt`, `rng.pt` and `state.json` (steps done, the
scheduler, the training log, the run's identity, every file's size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io.stats_files import read_tensor_files, write_tensor_files
from ..io.steps import StepFolders

# 2: state.json lists the tensor shards apart from `files`, which now sizes every file of the step
STATE_VERSION = 2


def saved_state(folder: str | Path) -> tuple[Path, int] | None:
    """(folder, step) of the newest complete training state in `folder`, or None."""
    found = StepFolders(Path(folder), STATE_VERSION, pause="recover-save").latest()
    return None if found is None else (found[0], found[1]["step"])


class RecoverState:
    """Saves and restores one recovery run; `recover_(..., state=)` drives it. `identity` is what a
    resumed state must match (io.calib_state.run_identity)."""

    def __init__(self, folder: str | Path, every: int, resume: bool, identity: dict[str, Any]):
        self.dir, self.every, self.resume, self.identity = Path(folder), every, resume, identity
        self.steps = StepFolders(self.dir, STATE_VERSION, pause="recover-save")
        self.resumed_from = 0
        self._found = self.steps.to_resume(resume, identity, "training tokens")

    @property
    def saves(self) -> int:
        return self.steps.saves

    def restore(self, tensors: dict[str, torch.Tensor], optimizer, scheduler) -> tuple[int, list]:
        """Load the newest state into the live objects: (steps done, training log so far)."""
        if self._found is None:
            return 0, []
        folder, meta = self._found
        read_tensor_files(folder, meta["shards"], tensors)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True))
        self.resumed_from = meta["step"]
        print(f"[llm-gradprune] resuming recovery from {folder} (step {self.resumed_from})", flush=True)
        return meta["step"], meta["log"]

    def saved(self) -> tuple[Path, int] | None:
        """(folder, step) of the newest complete state on disk, or None."""
        return saved_state(self.dir)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, tensors: dict[str, torch.Tensor], optimizer, scheduler, log: list) -> Path:
        def write(folder: Path) -> dict[str, Any]:
            shards = write_tensor_files(folder, tensors)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(torch.get_rng_state(), folder / "rng.pt")
            return {"step": step, "shards": list(shards), "scheduler": scheduler.state_dict(), "log": log,
                    "identity": self.identity}  # fmt: skip

        return self.steps.save(step, write)

    def clear(self) -> None:
        self.steps.clear()
