"""Nothing lost (issue 23): inputs are never replaced by the output, one run per output folder, a full
disk is refused before the compute or reported in one line with the saved state kept.

Each refusal exits 2 with one line naming the bad value, and leaves every input as it was (names,
sizes, mtimes: `snapshot`). Runs go through `cli.main` in-process on a tiny model folder; the lock test
starts a second run as a subprocess (`start_cli`) paused at a calibration batch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
from collections import namedtuple

import pytest
import transformers.modeling_utils

from llm_gradprune import commands as cli
from llm_gradprune.calibration import loop
from llm_gradprune.errors import ConfigError
from llm_gradprune.faults import MARKER
from llm_gradprune.io.atomic import claim_output, lock_path, release_output
from llm_gradprune.job import preflight, skeleton

from .test_bad_input import snapshot
from .tiny_folder import make_model_folder, make_text_file, start_cli

DATA = ["--num-samples", "4", "--seq-len", "16", "--no-progress"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A model, a text file and a checkpoint pruned from them (the input of `recover`)."""
    root = tmp_path_factory.mktemp("assets")
    a = {"model": make_model_folder(root / "model"), "text": make_text_file(root / "t.txt")}
    assert cli.main(["prune", "--model", str(a["model"]), "--dataset", str(a["text"]), "--output-dir",
                     str(root / "p50"), *DATA]) == 0  # fmt: skip
    return {**a, "pruned": root / "p50"}


def _copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return dst


def _prune(ws, a, model, data, out):
    return [
        "prune",
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--overwrite",
        *DATA,
    ]


def _recover(ws, a, pruned, out, *extra):
    return ["recover", str(pruned), "--dataset", str(a["text"]), "--output-dir", str(out), "--overwrite",
            "--recover-steps", "2", "--no-progress", *extra]  # fmt: skip


# Each setup builds its inputs under the workspace `ws` and returns the command line.
def output_holds_model(ws, a):  # the issue's `prune --model D/tiny --output-dir D --overwrite`
    return _prune(ws, a, _copy(a["model"], ws / "D" / "tiny"), a["text"], ws / "D")


def output_is_model(ws, a):
    return _prune(ws, a, _copy(a["model"], ws / "m"), a["text"], ws / "m")


def output_inside_model(ws, a):
    return _prune(ws, a, _copy(a["model"], ws / "m"), a["text"], ws / "m" / "out")


def output_links_to_model_parent(ws, a):  # a symlink is resolved before comparing
    _copy(a["model"], ws / "D" / "tiny")
    (ws / "link").symlink_to(ws / "D")
    return _prune(ws, a, ws / "D" / "tiny", a["text"], ws / "link")


def model_through_symlink(ws, a):
    _copy(a["model"], ws / "D" / "tiny")
    (ws / "alias").symlink_to(ws / "D" / "tiny")
    return _prune(ws, a, ws / "alias", a["text"], ws / "D")


def output_holds_data(ws, a):
    return _prune(ws, a, a["model"], _copy(a["text"], ws / "D" / "t.txt"), ws / "D")


def output_is_data(ws, a):
    return _prune(ws, a, a["model"], _copy(a["text"], ws / "t.txt"), ws / "t.txt")


def recover_output_holds_pruned(ws, a):  # the issue's `recover D/p50 --output-dir D --overwrite`
    return _recover(ws, a, _copy(a["pruned"], ws / "D" / "p50"), ws / "D")


def recover_output_is_pruned(ws, a):
    return _recover(ws, a, _copy(a["pruned"], ws / "p50"), ws / "p50")


def recover_output_holds_teacher(ws, a):
    teacher = _copy(a["model"], ws / "E" / "base")
    return _recover(ws, a, a["pruned"], ws / "E", "--recover-distill-alpha", "0.5", "--recover-teacher",
                    str(teacher))  # fmt: skip


def output_holds_config(ws, a):
    config = ws / "D" / "run.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("sparsity: 0.5\n")
    return [*_prune(ws, a, a["model"], a["text"], ws / "D"), "--config", str(config)]


INPUT_ROWS = [
    ("output-holds-model", output_holds_model, r"output_dir '.*/D' holds the model's own folder '.*/D/tiny', which "
     r"replacing the output would delete"),
    ("output-is-model", output_is_model, r"output_dir '.*/m' is the model's own folder '.*/m'"),
    ("output-inside-model", output_inside_model, r"output_dir '.*/m/out' is inside the model's own folder '.*/m'"),
    ("output-symlink-holds-model", output_links_to_model_parent, r"output_dir '.*/link' holds the model's own "
     r"folder '.*/D/tiny'"),
    ("model-symlink-inside-output", model_through_symlink, r"output_dir '.*/D' holds the model's own folder "
     r"'.*/D/tiny'"),
    ("output-holds-data", output_holds_data, r"output_dir '.*/D' holds the dataset '.*/D/t\.txt'"),
    ("output-is-data", output_is_data, r"output_dir '.*/t\.txt' is the dataset '.*/t\.txt'"),
    ("recover-output-holds-pruned", recover_output_holds_pruned, r"output_dir '.*/D' holds the pruned folder "
     r"'.*/D/p50'"),
    ("recover-output-is-pruned", recover_output_is_pruned, r"output_dir '.*/p50' is the pruned folder '.*/p50'"),
    ("output-holds-config", output_holds_config, r"output_dir '.*/D' holds the config file '.*/D/run\.yaml'"),
    ("recover-output-holds-teacher", recover_output_holds_teacher, r"output_dir '.*/E' holds the teacher model "
     r"'.*/E/base'"),
]  # fmt: skip


def _no_load(*a, **k):
    raise AssertionError("the model was loaded before the bad output folder was refused")


def _refused(args, capsys) -> str:
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("llm-gradprune: error: ")
    return err


@pytest.mark.parametrize("setup,message", [r[1:] for r in INPUT_ROWS], ids=[r[0] for r in INPUT_ROWS])
def test_an_output_that_would_replace_an_input_is_refused(
    setup, message, assets, tmp_path, capsys, monkeypatch
):
    """With --overwrite too: one line naming both paths, before the model is loaded, nothing lost."""
    args = setup(tmp_path, assets)
    monkeypatch.setattr(skeleton, "load", _no_load)
    before = snapshot(tmp_path, assets["model"], assets["pruned"])
    err = _refused(args, capsys)
    assert re.search(message, err), err
    assert snapshot(tmp_path, assets["model"], assets["pruned"]) == before


# -- one run per output folder --------------------------------------------------------------------------
def _paused(proc):
    for line in proc.stderr:
        if line.startswith(MARKER):
            return
    raise AssertionError(f"run ended (rc {proc.wait()}) without pausing")


def test_a_second_run_into_the_same_output_is_refused_and_a_killed_runs_lock_is_replaced(
    assets, tmp_path, capsys
):
    out = tmp_path / "out"
    args = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--output-dir", str(out),
            *DATA]  # fmt: skip
    first = start_cli(args, "batch:1")
    try:
        _paused(first)
        before = snapshot(tmp_path, assets["model"])
        err = _refused(args, capsys)  # without --overwrite, as in the issue
        assert re.search(rf"output_dir '{out}' is being written by another run \(pid {first.pid} on "
                         rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d: ", err), err  # fmt: skip
        assert (
            f": llm-gradprune prune --model {assets['model']} " in err and f"(lock: {lock_path(out)})" in err
        )
        assert snapshot(tmp_path, assets["model"]) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_path(out).exists()  # a killed run cannot clean up: its lock stays, stale

    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"note: stale lock {lock_path(out)} of a run that is gone (pid {first.pid}, started " in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the lock is released when the run ends


def test_the_lock_of_a_live_run_elsewhere_is_respected_and_ours_released(tmp_path):
    out = tmp_path / "new" / "out"
    lock = claim_output(out, "llm-gradprune prune ...")
    record = json.loads(lock.read_text())
    assert record["pid"] == os.getpid() and record["command"] == "llm-gradprune prune ..."
    release_output(lock)
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone with it

    out = tmp_path / "out"
    lock_path(out).write_text(
        json.dumps({"pid": 1, "host": "another-host", "started": "2024-01-01 00:00:00"})
    )
    with pytest.raises(ConfigError, match=r"being written by another run \(pid 1 on another-host"):
        claim_output(out, "x")
    lock_path(out).write_text("")  # a lock being written this instant: held, and said so
    with pytest.raises(ConfigError, match=r"is locked by another run \(.*\.out\.lock cannot be read\)"):
        claim_output(out, "x")
    release_output(lock_path(out))  # not ours: left alone
    assert lock_path(out).exists()


def test_only_the_main_process_takes_the_lock(tmp_path):
    acc = namedtuple("Acc", "is_main_process")
    assert skeleton.claim_on_main(acc(False), tmp_path / "out") is None
    assert list(tmp_path.iterdir()) == []
    lock = skeleton.claim_on_main(acc(True), tmp_path / "out")
    assert lock == lock_path(tmp_path / "out") and lock.exists()
    release_output(lock)


# -- a full disk ------------------------------------------------------------------------------------------
def _little_space(monkeypatch, free):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=free))


def _args(assets, out, *extra):
    return ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--output-dir", str(out),
            *DATA, *extra]  # fmt: skip


def test_too_little_space_is_refused_when_the_run_is_planned(assets, tmp_path, capsys, monkeypatch):
    _little_space(monkeypatch, 10 << 20)
    monkeypatch.setattr(skeleton, "load", _no_load)
    before = snapshot(tmp_path, assets["model"])
    err = _refused(_args(assets, tmp_path / "out"), capsys)
    assert re.search(r"output_dir '.*/out' has 10\.5 MB free in '.*', but the checkpoint needs about 33\.\d MB "
                     r"\(float32 weights of the model\): free some space or choose another output folder", err), err  # fmt: skip
    assert snapshot(tmp_path, assets["model"]) == before


def test_a_size_known_only_once_loaded_is_checked_before_calibration(assets, tmp_path, capsys, monkeypatch):
    """A Hub model's size is known once it is loaded: checked then, before any text is read."""
    _little_space(monkeypatch, 10 << 20)
    monkeypatch.setattr(preflight, "folder_weight_bytes", lambda *a: None)
    monkeypatch.setattr(skeleton, "folder_weight_bytes", lambda *a: None)
    monkeypatch.setattr(loop, "calibrate", _no_load)
    before = snapshot(assets["model"])
    err = _refused(_args(assets, tmp_path / "out"), capsys)
    assert "the checkpoint needs about 33." in err and "(float32 weights of the loaded model)" in err
    assert list(tmp_path.iterdir()) == [] and snapshot(assets["model"]) == before


DISK_FULL = [
    OSError(errno.ENOSPC, "No space left on device"),
    # what safetensors raises from Rust on a full disk (checked on a 200 KB tmpfs)
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
]


@pytest.mark.parametrize("error", DISK_FULL, ids=["oserror", "safetensors"])
def test_a_disk_full_during_the_save_is_one_line_and_keeps_the_state(
    error, assets, tmp_path, capsys, monkeypatch
):
    out, state = tmp_path / "out", tmp_path / "state"
    args = _args(assets, out, "--save-state-every", "2", "--state-dir", str(state))

    def disk_full(*a, **k):
        raise error

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    before = snapshot(assets["model"])
    err = _refused(args, capsys)
    assert re.search(rf"could not write the checkpoint to '{out}': no space left on device \(.*No space left on "
                     rf"device.*\); the saved state is kept in '{state}': free some space and rerun with --resume$",
                     err), err  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["state"]  # no output, no partial folder, no lock
    assert snapshot(assets["model"]) == before

    monkeypatch.undo()  # space freed: the rerun continues from the saved state, it does not recalibrate
    assert cli.main([*args, "--resume"]) == 0
    assert f"resuming calibration from {state}/step-00000004 (batch 4)" in capsys.readouterr().out
    assert (out / "pruning_report.json").is_file() and not state.exists()


def test_a_disk_full_without_a_saved_state_says_nothing_was_written(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EDQUOT, "Disk quota exceeded")))  # fmt: skip
    err = _refused(_args(assets, tmp_path / "out"), capsys)
    assert re.search(r"could not write the checkpoint to '.*/out': disk quota exceeded \(.*\); nothing was "
                     r"written: free some space and rerun$", err), err  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_another_write_error_is_not_called_a_full_disk():
    assert preflight.space_error(OSError(errno.EACCES, "Permission denied")) is None
    assert preflight.space_error(RuntimeError("I/O error: Permission denied (os error 13)")) is None
    assert preflight.space_error(OSError(errno.ENOSPC, "x")) == "no space left on device"
