"""Issue 23's recovery, rounds, teacher and report rows (docs/RELIABILITY.md section 9): each bad input or
failure of `recover` (and of `prune` with recovery) ends in one line naming the bad value or the step,
exit 2, with nothing written and nothing the user had lost.

One tiny pruned folder is made per module; every test works on copies or new output folders next to it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm_gradprune import commands as cli
from llm_gradprune.recovery import trainer
from llm_gradprune.recovery.config import RecoverConfig
from llm_gradprune.recovery.state import RecoverState
from llm_gradprune.recovery.trainer import TrainingDiverged, recover_

from .test_recovery import pruned, train_batches
from .tiny_folder import ROOT, make_model_folder, make_text_file


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model, text = make_model_folder(root / "model"), make_text_file(root / "t.txt", lines=400)
    folder = root / "pruned"
    assert cli.main(["prune", "--model", str(model), "--criterion", "fisher", "--num-samples", "4", "--seq-len",
                     "16", "--dataset", str(text), "--output-dir", str(folder), "--no-progress"]) == 0  # fmt: skip
    return {"model": model, "text": text, "pruned": folder, "root": root}


def recover_args(a, folder, out, *extra) -> list[str]:
    return ["recover", str(folder), "--dataset", str(a["text"]), "--recover-batch-size", "2", "--recover-seq-len",
            "16", "--recover-steps", "4", "--output-dir", str(out), "--no-progress", *extra]  # fmt: skip


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its size and mtime; a folder's own mtime is left out (the output lock
    next to the output folder comes and goes, nothing else may)."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            out[str(p)] = (True,) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
    return out


def one_line_error(argv, capsys, *watched: Path) -> str:
    """Run the CLI, expect exit 2 with one line, and nothing under `watched` created, changed or removed."""
    before = snapshot(*watched)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llm-gradprune: error: "), err
    assert snapshot(*watched) == before
    return err


# -- a non-finite loss or weight stops training, naming the step -------------------------------------
def test_a_diverging_recovery_stops_in_one_line_naming_the_step(assets, tmp_path, capsys, monkeypatch):
    # a diverging run: the loss turns NaN at step 2 (an lr that large is refused when planned, above 1)
    real, calls = trainer.lm_and_distill_loss, {"n": 0}

    def nan_at_step_2(*a, **k):
        calls["n"] += 1
        loss, parts = real(*a, **k)
        return (loss * float("nan"), {**parts, "lm": float("nan")}) if calls["n"] == 2 else (loss, parts)

    monkeypatch.setattr(trainer, "lm_and_distill_loss", nan_at_step_2)
    out = tmp_path / "out"
    err = one_line_error(recover_args(assets, assets["pruned"], out, "--recover-lr", "0.5"), capsys,
                         tmp_path, assets["pruned"])  # fmt: skip
    assert re.search(r"recovery training stopped at step 2 of 4: the lm loss is nan; no checkpoint", err), err
    assert "recover_lr, now 0.5" in err and not out.exists()


def test_divergence_keeps_the_training_state_saved_before_it(tmp_path, monkeypatch):
    real = trainer.lm_and_distill_loss
    calls = {"n": 0}

    def nan_at_step_5(*a, **k):
        calls["n"] += 1
        loss, parts = real(*a, **k)
        return (loss * float("nan"), {**parts, "lm": float("nan")}) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(trainer, "lm_and_distill_loss", nan_at_step_5)
    state = RecoverState(tmp_path / "s", 2, False, {"run": "t"})
    cfg = RecoverConfig(steps=7, lr=3e-3, save_state_every=2, batch_size=4)
    with pytest.raises(
        TrainingDiverged, match=r"step 5 of 7: the lm loss is nan; .* state of step 4 is kept"
    ):
        recover_(pruned(), train_batches(), cfg, state=state, progress=False)
    assert state.saved() == (tmp_path / "s" / "step-00000004", 4)


def test_a_non_finite_weight_after_the_last_step_is_never_returned(monkeypatch):
    real = trainer._optimizer_step
    calls = {"n": 0}

    def poisoned(parts, cfg):  # the last step's update leaves an inf that no later loss would see
        real(parts, cfg)
        calls["n"] += 1
        if calls["n"] == 2:
            next(iter(parts.trained.values())).data[0, 0] = float("inf")

    monkeypatch.setattr(trainer, "_optimizer_step", poisoned)
    cfg = RecoverConfig(steps=2, lr=3e-3, batch_size=4)
    with pytest.raises(TrainingDiverged, match=r"step 2 of 2: model\.layers\.0\.\S+ holds non-finite values"):
        recover_(pruned(), train_batches(), cfg, progress=False)


def no_training(monkeypatch):
    """Every refusal below comes when the run is planned: training would fail the test."""
    import llm_gradprune.job.recovery as job_recovery

    def refuse(*a, **k):
        raise AssertionError("recovery training started before the bad input was refused")

    monkeypatch.setattr(job_recovery, "recover_", refuse)


def copy_pruned(a, dst: Path) -> Path:
    shutil.copytree(a["pruned"], dst)
    return dst


# -- the pruned folder's report, checked when the run is planned --------------------------------------
def _drop_target_weights(text: str) -> str:
    report = json.loads(text)
    del report["target_weights"]
    return json.dumps(report)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t: t[:300], r"pruning_report\.json is not valid JSON \(Expecting"),
        (lambda t: "[]", r"pruning_report\.json is not a report llm-gradprune reads"),
        (lambda t: "{}", r"pruning_report\.json holds no per-tensor zero counts"),
        (_drop_target_weights, r"pruning_report\.json holds no target_weights count"),
    ],
    ids=["truncated", "list", "empty-object", "no-target-weights"],
)
def test_a_damaged_report_is_refused_before_training(assets, tmp_path, capsys, monkeypatch, damage, message):
    no_training(monkeypatch)
    folder = copy_pruned(assets, tmp_path / "pruned")
    report = folder / "pruning_report.json"
    report.write_text(damage(report.read_text()))
    err = one_line_error(recover_args(assets, folder, tmp_path / "out"), capsys, tmp_path)
    assert re.search(message, err) and str(folder) in err, err


# -- the default output folder -------------------------------------------------------------------------
def test_recover_on_out_pruned_without_output_dir_names_the_default(assets, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    copy_pruned(assets, tmp_path / "out" / "pruned")
    monkeypatch.chdir(tmp_path)
    argv = [a for a in recover_args(assets, "out/pruned", "x") if a not in ("--output-dir", "x")]
    err = one_line_error(argv, capsys, tmp_path)
    assert err.endswith(
        "recover writes to 'out/pruned' unless --output-dir is given, and that is the pruned folder 'out/pruned' "
        "it reads: give --output-dir for the recovered model"
    ), err


# -- the teacher, checked when the run is planned -------------------------------------------------------
def test_a_teacher_that_does_not_exist_is_named(assets, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    teacher = str(tmp_path / "no-such-teacher")
    argv = recover_args(assets, assets["pruned"], tmp_path / "out", "--recover-distill-alpha", "0.5",
                        "--recover-teacher", teacher)  # fmt: skip
    err = one_line_error(argv, capsys, tmp_path, assets["pruned"])
    assert f"recover_teacher {teacher!r} does not exist: give --recover-teacher" in err, err


def test_a_deleted_base_model_is_named_as_the_default_teacher(assets, tmp_path, capsys, monkeypatch):
    """The pruned folder's report names its base model; once that folder is gone, the default teacher is."""
    no_training(monkeypatch)
    base = shutil.copytree(assets["model"], tmp_path / "base")
    folder = tmp_path / "pruned"
    assert cli.main(["prune", "--model", str(base), "--criterion", "fisher", "--num-samples", "4", "--seq-len", "16",
                     "--dataset", str(assets["text"]), "--output-dir", str(folder), "--no-progress"]) == 0  # fmt: skip
    shutil.rmtree(base)
    argv = recover_args(assets, folder, tmp_path / "out", "--recover-distill-alpha", "0.5")
    err = one_line_error(argv, capsys, tmp_path)
    assert (
        f"the teacher (by default the base model {str(base)!r} the pruned folder was made from) does not exist"
        in err
    )


def test_a_teacher_with_another_vocabulary_is_refused_before_training(assets, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    teacher = make_model_folder(tmp_path / "teacher", vocab=200)
    argv = recover_args(assets, assets["pruned"], tmp_path / "out", "--recover-distill-alpha", "0.5",
                        "--recover-teacher", str(teacher))  # fmt: skip
    err = one_line_error(argv, capsys, tmp_path, assets["pruned"])
    assert f"recover_teacher {str(teacher)!r} has a vocabulary of 200 tokens and the model 128" in err, err


def test_an_unreachable_hub_teacher_is_named(assets, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait in tests
    no_training(monkeypatch)
    argv = recover_args(assets, assets["pruned"], tmp_path / "out", "--recover-distill-alpha", "0.5",
                        "--recover-teacher", "no-such-org/no-such-teacher")  # fmt: skip
    err = one_line_error(argv, capsys, tmp_path, assets["pruned"])
    assert "recover_teacher 'no-such-org/no-such-teacher': teacher model 'no-such-org/no-such-teacher' could not be " \
        "reached" in err, err  # fmt: skip


# -- too many steps for the text ---------------------------------------------------------------------------
def test_too_many_recover_steps_names_the_recover_flag(assets, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    argv = recover_args(assets, assets["pruned"], tmp_path / "out", "--recover-steps", "100000000")
    err = one_line_error(argv, capsys, tmp_path, assets["pruned"])
    assert "but recovery training asks for 200000000 (100000000 steps x recover_batch_size 2 x recover_grad_accum 1)" \
        ": lower --recover-steps" in err and "num_samples" not in err, err  # fmt: skip


# -- resume: changed settings refused, every step's tokens counted ------------------------------------------
def test_a_resumed_recovery_refuses_a_changed_lr_and_counts_every_steps_tokens(assets, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    real = trainer.lm_and_distill_loss
    calls = {"n": 0}

    def interrupted_in_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "out"
    argv = recover_args(assets, assets["pruned"], out, "--recover-save-state-every", "2")
    monkeypatch.setattr(trainer, "lm_and_distill_loss", interrupted_in_step_3)
    assert cli.main(argv) == 130 and not out.exists()
    monkeypatch.setattr(trainer, "lm_and_distill_loss", real)
    state = tmp_path / "out.recover-state"
    assert (state / "step-00000002").is_dir()
    err = one_line_error([*argv, "--resume", "--recover-lr", "0.01"], capsys, tmp_path, assets["pruned"])
    assert "config differs from the saved run (recover_lr 0.0001 -> 0.01)" in err, err
    assert cli.main([*argv, "--resume"]) == 0
    rec = json.loads((out / "pruning_report.json").read_text())["recovery"]
    assert rec["resumed_from_step"] == 2 and rec["lr"] == 1e-4
    assert rec["tokens"] == 4 * 2 * 16  # the two steps before the resume count too
    assert not state.exists()


# -- rounds and saved states ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--save-state-every", "2"], "save_state_every / resume with rounds is not supported"),
        (["--resume"], "save_state_every / resume with rounds is not supported"),
        (["--recover-steps", "2", "--recover-save-state-every", "1"],
         "recover_save_state_every 1 with rounds 2 saves a training state that no run can resume"),
    ],
    ids=["save-state-every", "resume", "recover-save-state-every"],
)  # fmt: skip
def test_rounds_refuse_saved_states_they_cannot_resume(assets, tmp_path, capsys, monkeypatch, flags, message):
    no_training(monkeypatch)
    argv = ["prune", "--model", str(assets["model"]), "--criterion", "fisher", "--num-samples", "4", "--seq-len", "16",
            "--dataset", str(assets["text"]), "--rounds", "2", "--output-dir", str(tmp_path / "out"), "--no-progress",
            *flags]  # fmt: skip
    err = one_line_error(argv, capsys, tmp_path, assets["model"])
    assert message in err, err


# -- lm-eval tasks offline ------------------------------------------------------------------------------------
def test_eval_tasks_offline_is_one_line_naming_the_task(assets, tmp_path):
    """A separate process: HF_HUB_OFFLINE is read when huggingface_hub and datasets are imported."""
    pytest.importorskip("lm_eval")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds"),
           "HF_HUB_CACHE": str(tmp_path / "hub")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "llm_gradprune", "eval", str(assets["model"]), "--tasks", "boolq"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
        "llm-gradprune: error: the data set of eval task 'boolq' could not be reached at https://huggingface.co "
        "(HF_HUB_OFFLINE is set) and is not in the local cache: download it first, or give a local path "
        "(--include-path for local task files)"
    )
