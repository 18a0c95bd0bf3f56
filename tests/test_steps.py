"""The step-folder primitive (io/steps.py) that the calibration and the recovery state both save through:
a step is on disk complete or not at all, whatever moment a run is killed at."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from llm_gradprune.calibration.stats import ActStats, GradStats, Statistics
from llm_gradprune.errors import ConfigError
from llm_gradprune.faults import PAUSE_ENV
from llm_gradprune.io.calib_state import CalibState
from llm_gradprune.io.steps import StepFolders
from llm_gradprune.recovery.state import RecoverState
from llm_gradprune.targets import find_targets

from .conftest import make_tiny_llama
from .tiny_folder import ROOT, kill_when_paused


def _writer(payload: bytes, **meta):
    def write(folder):
        (folder / "a.bin").write_bytes(payload)
        (folder / "b.bin").write_bytes(payload * 2)
        return meta

    return write


def test_a_save_records_every_size_and_keeps_only_the_newest_step(tmp_path):
    steps = StepFolders(tmp_path / "s", version=7, pause="x")
    steps.save(1, _writer(b"one", n=1))
    final = steps.save(2, _writer(b"two!", n=2))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["step-00000002"]
    folder, meta = steps.latest()
    assert folder == final and meta == {"version": 7, "n": 2, "files": {"a.bin": 4, "b.bin": 8}}
    assert steps.saves == 2


def test_a_step_whose_sizes_or_version_do_not_match_is_skipped(tmp_path):
    steps = StepFolders(tmp_path / "s", version=1, pause="x")
    good = steps.save(3, _writer(b"abc", n=3))
    short = shutil.copytree(good, tmp_path / "s" / "step-00000004")
    (short / "b.bin").write_bytes(b"abc")  # truncated: 3 bytes, 6 recorded
    other = shutil.copytree(good, tmp_path / "s" / "step-00000005")
    meta = json.loads((other / "state.json").read_text())
    (other / "state.json").write_text(json.dumps({**meta, "version": 0}))
    (tmp_path / "s" / "step-00000006").mkdir()  # no state.json at all
    assert steps.latest()[0] == good
    assert StepFolders(tmp_path / "s", version=0, pause="x").latest()[0] == other


def test_tmp_leftovers_are_ignored_then_cleaned_by_the_next_save(tmp_path):
    steps = StepFolders(tmp_path / "s", version=1, pause="x")
    steps.save(1, _writer(b"a"))
    # a complete-looking step under a temporary name is a killed save's: never picked
    leftover = shutil.copytree(tmp_path / "s" / "step-00000001", tmp_path / "s" / ".tmp-step-00000009-x")
    assert steps.latest()[0].name == "step-00000001"
    steps.save(2, _writer(b"b"))
    assert not leftover.exists() and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["step-00000002"]


def test_a_step_saved_again_replaces_the_earlier_one(tmp_path):
    steps = StepFolders(tmp_path / "s", version=1, pause="x")
    steps.save(2, _writer(b"old", n="old"))
    steps.save(2, _writer(b"newer", n="new"))
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["step-00000002"]
    assert steps.latest()[1]["n"] == "new"
    assert (tmp_path / "s" / "step-00000002" / "a.bin").read_bytes() == b"newer"


def test_a_failed_write_leaves_the_previous_step(tmp_path):
    steps = StepFolders(tmp_path / "s", version=1, pause="x")
    steps.save(1, _writer(b"a", n=1))

    def failing(folder):
        (folder / "a.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        steps.save(2, failing)
    assert steps.latest()[1]["n"] == 1


def test_every_file_and_both_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def counting(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    renamed = []
    real_rename = os.rename
    monkeypatch.setattr(os, "fsync", counting)
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append(len(synced)), real_rename(a, b)))
    StepFolders(tmp_path / "s", version=1, pause="x").save(1, _writer(b"a"))
    before = synced[: renamed[0]]
    assert {"a.bin", "b.bin", "state.json"} <= set(before)
    assert any(name.startswith(".tmp-step-00000001-") for name in before)  # the step's own entries
    assert synced[renamed[0] :] == ["s"]  # the state folder's entry for the renamed step


def test_sigkill_between_write_and_rename_leaves_the_previous_step(tmp_path):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from llm_gradprune.io.steps import StepFolders
        steps = StepFolders(Path({str(tmp_path / "s")!r}), version=1, pause="x")
        for n in (1, 2):
            steps.save(n, lambda f, n=n: (f.joinpath("a.bin").write_bytes(b"%d" % n), {{"n": n}})[1])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), PAUSE_ENV: "x:2"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    kill_when_paused(proc)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names[0].startswith(".tmp-step-00000002-") and names[1:] == ["step-00000001"]
    assert StepFolders(tmp_path / "s", version=1, pause="x").latest()[1]["n"] == 1


# -- its two users --------------------------------------------------------------------------------
@pytest.fixture
def spied(monkeypatch):
    pauses = []
    real = StepFolders.save

    def spy(self, step, write):
        pauses.append(self.pause)
        return real(self, step, write)

    monkeypatch.setattr(StepFolders, "save", spy)
    return pauses


def _calib_stats(model):
    targets = find_targets(model)
    grad = GradStats({f"{n}.weight": m.weight for n, m in targets.items()}, {"grad_sq_sum"})
    return Statistics({"grad": grad, "act": ActStats(targets)})


def test_the_calibration_and_the_recovery_state_both_save_through_it(tmp_path, spied):
    ident = {"config": {"lr": 1}, "model": "m", "data": "d"}
    calib = CalibState(tmp_path / "c", 1, False, ident)
    calib.restore(_calib_stats(make_tiny_llama()))
    calib.save(3, 48, 1.5)
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    RecoverState(tmp_path / "r", 1, False, ident).save(5, {"w": w.data}, opt, sched, [{"step": 5}])
    assert spied == ["save", "recover-save"]
    cmeta = StepFolders(tmp_path / "c", 2, "save").latest()[1]
    rmeta = StepFolders(tmp_path / "r", 2, "recover-save").latest()[1]
    assert cmeta["batches_done"] == 3 and set(cmeta["files"]) == {"stats-00000.safetensors"}
    assert set(rmeta["files"]) == {"stats-00000.safetensors", "optimizer.pt", "rng.pt"}

    resumed = RecoverState(tmp_path / "r", 1, True, ident)
    assert resumed.restore({"w": torch.zeros(4)}, opt, sched) == (5, [{"step": 5}])
    refused = r"cannot resume '.*step-00000005': the config differs from the saved run \(lr 1 -> 2\)"
    with pytest.raises(ConfigError, match=refused):
        RecoverState(tmp_path / "r", 1, True, {**ident, "config": {"lr": 2}})
    with pytest.raises(ConfigError, match="the training tokens differ"):
        RecoverState(tmp_path / "r", 1, True, {**ident, "data": "other"})
