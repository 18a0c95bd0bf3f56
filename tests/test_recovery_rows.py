"""Issue 23's recovery, rounds, teacher and report rows (docs/RELIABILITY.md section 9): each bad input or
failure of `recover` (and of `prune` with recovery) ends in one line naming the bad value or the step,
exit 2, with nothing written and nothing the user had lost.

One tiny pruned folder is made per module; every test works on copies or new output folders next to it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llm_gradprune import commands as cli
from llm_gradprune.recovery import trainer
from llm_gradprune.recovery.config import RecoverConfig
from llm_gradprune.recovery.state import RecoverState
from llm_gradprune.recovery.trainer import TrainingDiverged, recover_

from .test_recovery import pruned, train_batches
from .tiny_folder import make_model_folder, make_text_file


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
def test_a_diverging_recovery_stops_in_one_line_naming_the_step(assets, tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_error(recover_args(assets, assets["pruned"], out, "--recover-lr", "1e30"), capsys,
                         tmp_path, assets["pruned"])  # fmt: skip
    assert re.search(r"recovery training stopped at step \d of 4: the lm loss is nan; no checkpoint", err), (
        err
    )
    assert "recover_lr, now 1e+30" in err and not out.exists()


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
