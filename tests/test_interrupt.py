"""Ctrl-C and SIGTERM end a run with one line saying where it stopped, exit 130, no partial output, and,
when the calibration state was being saved, the exact command that resumes it."""

from __future__ import annotations

import shlex
import signal

import pytest

from .tiny_folder import make_model_folder, make_text_file, signal_when_paused, start_cli


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": make_model_folder(root / "model"), "text": make_text_file(root / "t.txt")}


def args(assets, out, *extra):
    return ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--num-samples", "6",
            "--seq-len", "16", "--criterion", "fisher", "--output-dir", str(out), "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("sig,name", [(signal.SIGINT, "SIGINT (Ctrl-C)"), (signal.SIGTERM, "SIGTERM")])
def test_interrupt_during_calibration_is_one_line_and_writes_nothing(assets, tmp_path, sig, name):
    out = tmp_path / "out"
    rc, err = signal_when_paused(start_cli(args(assets, out), "batch:2"), sig)
    assert rc == 130
    assert (
        err.strip()
        == f"llm-gradprune: interrupted by {name} during calibration, batch 2 of 6; nothing was written"
    )
    assert list(tmp_path.iterdir()) == []


def test_interrupt_with_saved_state_prints_the_resume_command_that_works(assets, tmp_path):
    out = tmp_path / "out"
    argv = args(assets, out, "--save-state-every", "2")
    rc, err = signal_when_paused(start_cli(argv, "batch:3"), signal.SIGINT)
    assert rc == 130 and err.count("\n") == 1, err
    head, _, command = err.strip().partition("; calibration state saved at batch 2: resume with ")
    assert head == "llm-gradprune: interrupted by SIGINT (Ctrl-C) during calibration, batch 3 of 6"
    assert not out.exists() and (tmp_path / "out.calib-state").is_dir()
    words = shlex.split(command)
    assert words[:2] == ["llm-gradprune", "prune"] and words[-1] == "--resume" and words[2:-1] == argv[1:]
    proc = start_cli(words[1:], None)  # the printed command, as printed
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "resuming calibration from" in stdout and (out / "pruning_report.json").is_file()
    assert not (tmp_path / "out.calib-state").exists()  # cleared once the checkpoint is in place


def test_interrupt_during_rounds_names_the_round(assets, tmp_path):
    out = tmp_path / "out"
    rc, err = signal_when_paused(start_cli(args(assets, out, "--rounds", "2"), "batch:2"), signal.SIGINT)
    assert rc == 130
    assert err.strip() == (
        "llm-gradprune: interrupted by SIGINT (Ctrl-C) during pruning round 1 of 2, calibration, batch 2 of 6; "
        "nothing was written"
    )
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_recovery_with_a_saved_state_prints_the_resume_command(assets, tmp_path):
    """Ctrl-C inside the second training-state save: step 2 is on disk, and the line says so."""
    from llm_gradprune import commands as cli

    pruned, out = tmp_path / "pruned", tmp_path / "rec"
    assert cli.main(args(assets, pruned)) == 0
    argv = ["recover", str(pruned), "--dataset", str(assets["text"]), "--recover-steps", "6", "--recover-batch-size",
            "2", "--recover-seq-len", "16", "--recover-save-state-every", "2", "--output-dir", str(out),
            "--no-progress"]  # fmt: skip
    rc, err = signal_when_paused(start_cli(argv, "recover-save:2"), signal.SIGINT)
    assert rc == 130 and err.count("\n") == 1, err
    head, _, command = err.strip().partition("; training state saved at step 2: resume with ")
    assert head == "llm-gradprune: interrupted by SIGINT (Ctrl-C) during recovery training, step 4 of 6"
    assert not out.exists() and (tmp_path / "rec.recover-state" / "step-00000002").is_dir()
    words = shlex.split(command)
    assert words[:2] == ["llm-gradprune", "recover"] and words[-1] == "--resume" and words[2:-1] == argv[1:]
    proc = start_cli(words[1:], None)  # the printed command, as printed
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "resuming recovery from" in stdout and "in 6 steps (192 tokens" in stdout
    assert not (tmp_path / "rec.recover-state").exists()  # cleared once the checkpoint is in place
