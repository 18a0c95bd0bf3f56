"""The calibration state: fp32 sums saved every N batches, atomically, and continued after a crash.

(This is the only thing called a "state" here: the output model is the checkpoint, io/checkpoint.py.)
A state is a folder `step-<batches done>` inside the state folder (default `<output_dir>.calib-state`):

    stats-00000.safetensors ...   the fp32 sums (grad.<stat>.<param>, act.<module>, tok.<module>) and RNG states,
                                  split into files of at most SHARD_BYTES so host memory stays bounded
    state.json                    batches done, token/loss counters, per-tensor counts, the identity
                                  of the run (config, model fingerprint, calibration token hash), and
                                  the size of every stats file; written last

The step folders are io/steps.py's: written under a temporary name, every file and the folder fsynced,
only then renamed to `step-N`, older states removed after that. A kill at any moment therefore leaves
the previous complete state (a half-written `.tmp-*` folder is ignored and cleaned up). Resuming restores
the saved partial sums and adds the remaining batches to them in the original order: fp32 addition
in the same order gives bit-identical sums, hence bit-identical masks.

A state belongs to one run: `--resume` refuses it, naming what differs, when the config (apart from
run-control keys such as output_dir), the model fingerprint or the calibration token stream changed.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .stats_files import accumulator_counters, read_tensor_files, write_tensor_files
from .steps import StepFolders

STATE_VERSION = 2


# -- identity of a run (the settings part comes from the job: JobConfig.identity) -----------------
def model_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """sha256 over every parameter's name, dtype, shape and `samples` evenly spaced values.

    Cheap even for a 7B model (no full pass over the weights) yet changes with any other checkpoint,
    fine-tune or dtype; device-independent, so a state saved on one GPU resumes on another.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].contiguous().cpu()
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(config: dict[str, Any], model: torch.nn.Module, data_sha256: str | None) -> dict[str, Any]:
    """What a saved state belongs to: the settings it depends on, the model's fingerprint and the
    hash of the token stream it was computed from."""
    return {"config": config, "model": model_fingerprint(model), "data": data_sha256}


# -- the state folder --------------------------------------------------------------------------------
def resolve_state_dir(state_dir: str | None, output_dir: str) -> Path:
    """`state_dir`, else `<output_dir>.calib-state`."""
    if state_dir:
        return Path(state_dir).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    return out.with_name(out.name + ".calib-state")


def latest_state(state_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete state (folder, its state.json), or None. Incomplete ones are skipped."""
    return StepFolders(state_dir, STATE_VERSION, pause="save").latest()


def check_state_dir(state_dir: Path, output_dir: str | Path, every: int, resume: bool) -> None:
    """Before any work: a run that would silently overwrite a saved calibration is refused."""
    if not every and not resume:
        return
    out = Path(output_dir).expanduser().resolve()
    if state_dir == out or out in state_dir.parents:
        raise ConfigError(f"state_dir {str(state_dir)!r} is inside output_dir: the checkpoint replaces it")
    if resume:
        return
    found = latest_state(state_dir)
    if found is not None:
        raise ConfigError(
            f"state folder {str(found[0].parent)!r} holds a calibration saved at batch "
            f"{found[1]['batches_done']}: pass --resume to continue it, or delete the folder to start over"
        )


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors, {"python": random.getstate()}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda_keys = sorted(
        (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
    )
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


class CalibState:
    """Saves and restores one calibration's statistics; `calibrate(..., calib_state=)` drives it.
    `identity` (`run_identity`) is what a resumed state must match."""

    def __init__(self, state_dir: str | Path, every: int, resume: bool, identity: dict[str, Any]):
        self.dir = Path(state_dir)
        self.steps = StepFolders(self.dir, STATE_VERSION, pause="save")
        self.every = every
        self.resume = resume
        self.identity = identity
        self.resumed_from = 0
        self.last_saved = -1
        self._due = False
        self.stats = None  # calibration.stats.Statistics, bound by restore()
        self._found = self.steps.to_resume(resume, identity, "calibration tokens")

    @property
    def saves(self) -> int:
        return self.steps.saves

    # -- called by calibrate ---------------------------------------------------------------------
    def restore(self, stats) -> tuple[int, int, float]:
        """Bind the statistics; load the saved sums into them. Returns (batches, tokens, loss_sum) done."""
        self.stats = stats
        if self._found is None:
            if self.resume:
                print(f"[llm-gradprune] no saved calibration in {self.dir}: starting at batch 0", flush=True)
            return 0, 0, 0.0
        folder, meta = self._found
        # every file of a calibration step is a stats shard (the RNG states are tensors in them)
        rng = read_tensor_files(folder, meta["files"], self._tensors_by_key())
        for acc in stats.accumulators():
            acc.load_counters({k: meta["counters"][k] for k in acc.counters()})
        _set_rng_state(rng, meta["rng"])
        self.resumed_from = self.last_saved = meta["batches_done"]
        print(f"[llm-gradprune] resuming calibration from {folder} (batch {self.resumed_from})", flush=True)
        return meta["batches_done"], meta["tokens"], meta["loss_sum"]

    def after_batch(self, batches: int, tokens: int, loss_sum: float) -> None:
        if self.every and batches % self.every == 0:
            self._due = True
        # With gradient accumulation a partial group lives outside the sums: save at its boundary.
        if self._due and not (self.stats.grad is not None and self.stats.grad.accumulating):
            self.save(batches, tokens, loss_sum)

    def end(self, batches: int, tokens: int, loss_sum: float) -> None:
        if self.every and batches != self.last_saved:
            self.save(batches, tokens, loss_sum)

    # -- saving ----------------------------------------------------------------------------------
    def _tensors_by_key(self) -> dict[str, torch.Tensor]:
        return {k: t for acc in self.stats.accumulators() for k, t in acc.tensors().items()}

    def save(self, batches: int, tokens: int, loss_sum: float) -> Path:
        if self.stats.grad is not None:  # a gradient whose fold is deferred (host staging) belongs here
            self.stats.grad.flush()
        self._due = False
        final = self.steps.save(batches, lambda tmp: self._write(tmp, batches, tokens, loss_sum))
        self.last_saved = batches
        return final

    def _write(self, folder: Path, batches: int, tokens: int, loss_sum: float) -> dict[str, Any]:
        rng_tensors, rng_meta = _rng_state()
        write_tensor_files(folder, {**rng_tensors, **self._tensors_by_key()})
        config_sha256 = hashlib.sha256(json.dumps(self.identity["config"], sort_keys=True).encode())
        return {
            "batches_done": batches,
            "tokens": tokens,
            "loss_sum": loss_sum,  # a float: JSON round-trips it exactly
            "counters": accumulator_counters(self.stats),
            "rng": rng_meta,
            "identity": self.identity,
            "config_sha256": config_sha256.hexdigest(),
        }

    def clear(self) -> None:
        """Remove the state folder once the pruned checkpoint is safely in place."""
        self.steps.clear()
