"""The one job skeleton: every command's transform goes through the same steps, and the options the
three old copies of the job dropped are now applied or refused."""

from __future__ import annotations

import json

from llm_gradprune import commands as cli
from llm_gradprune.config import JobConfig
from llm_gradprune.job.recovery import recovery_state
from llm_gradprune.job.transforms import Keep, Prune, Shrink, transform_for

from .conftest import make_tiny_llama
from .tiny_folder import make_model_folder, make_text_file


def _flat(tmp_path, **kw) -> dict:
    return {"output_dir": str(tmp_path / "out"), "progress": False, **kw}


def test_each_command_is_one_transform_of_the_same_skeleton(tmp_path):
    assert type(transform_for(JobConfig.from_flat(_flat(tmp_path)))) is Prune
    assert type(transform_for(JobConfig.from_flat(_flat(tmp_path, rounds=2)))) is Prune
    assert type(transform_for(JobConfig.from_flat(_flat(tmp_path, structure="channels")))) is Shrink
    keep = Keep()
    assert keep.result is None and keep.given == "pruned"  # recover evaluates before and after training only


def test_rounds_with_saved_state_are_refused_before_any_work(tmp_path, capsys):
    """Rounds never passed the calibration state: resume was accepted and nothing was saved or resumed."""
    model = make_model_folder(tmp_path / "m")
    text = make_text_file(tmp_path / "t.txt")
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--criterion", "fisher", "--rounds", "2",
            "--save-state-every", "2", "--num-samples", "4", "--seq-len", "16", "--output-dir", str(tmp_path / "o"),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    err = [
        line for line in capsys.readouterr().err.splitlines() if "error" in line
    ]  # (the folder's save bars)
    assert len(err) == 1 and "save_state_every / resume with rounds is not supported" in err[0]
    assert not (tmp_path / "o").exists()


def test_recovery_state_depends_on_the_training_settings(tmp_path):
    """A resumed recovery trained at the saved lr while the report recorded the new one."""
    model = make_tiny_llama()
    base = _flat(tmp_path, recover_steps=4, recover_save_state_every=2)
    a = recovery_state(JobConfig.from_flat({**base, "recover_lr": 1e-4}), model, "h").identity
    b = recovery_state(JobConfig.from_flat({**base, "recover_lr": 3e-4}), model, "h").identity
    c = recovery_state(JobConfig.from_flat({**base, "recover_lr": 1e-4, "eval": True}), model, "h").identity
    assert a["config"] != b["config"]  # another learning rate: another run
    assert a == c  # evaluation is run control: it cannot change the trained weights


def test_recover_keeps_dense_perplexity_only_for_the_same_windows(tmp_path):
    keep = Keep()

    class J:
        cfg = JobConfig.from_flat(_flat(tmp_path, eval=True, eval_num_samples=2, seq_len=8))
        held_out = __import__("torch").zeros(2, 8, dtype=__import__("torch").long)

    from llm_gradprune.calibration.data import token_hash

    before = {"ppl": 9.0, "nll": 2.2, "tokens": 14, "windows": 2}
    same = {"dense_ppl": 5.0, "dense_nll": 1.6, "token_sha256": token_hash(J.held_out)}
    other = {**same, "token_sha256": "another text"}
    assert keep.eval_record(J, {"eval": same}, before, None)["dense_ppl"] == 5.0
    assert keep.eval_record(J, {"eval": other}, before, None)["dense_ppl"] is None
    assert keep.eval_record(J, {"eval": other}, None, None) == other  # no evaluation asked: the folder's own


def test_calibration_record_has_one_shape_for_every_kind_of_run(tmp_path):
    """Structured and unstructured reports carried two shapes of `calibration`."""
    model = make_model_folder(tmp_path / "m")
    text = make_text_file(tmp_path / "t.txt")
    common = ["--model", str(model), "--dataset", str(text), "--num-samples", "4", "--seq-len", "16",
              "--batch-size", "2", "--no-progress", "--threads", "1"]  # fmt: skip
    assert cli.main(["prune", *common, "--criterion", "fisher", "--output-dir", str(tmp_path / "u")]) == 0
    assert cli.main(["prune", *common, "--structure", "channels", "--output-dir", str(tmp_path / "s")]) == 0
    u = json.loads((tmp_path / "u" / "pruning_report.json").read_text())["calibration"]
    s = json.loads((tmp_path / "s" / "pruning_report.json").read_text())["calibration"]
    assert list(u) == list(s)
    assert u["samples"] == s["samples"] == 4 and u["seq_len"] == s["seq_len"] == 16
    assert u["token_sha256"] == s["token_sha256"]  # the same text read the same way
    assert u["tokens"] == s["tokens"] == 64 and u["passes"] is None and s["passes"]


JOB_ONLY = (
    "output_dir",
    "dataset",
    "model",
    "eval_split",
    "push_to_hub",
    "state_dir",
    "max_shard_bytes",
    "save_state_every",
    "resume",
    "trust_remote_code",
    "num_samples",
    "prune",
    "recover",
    "structured",
)


def test_no_stage_below_the_job_reads_the_job_config():
    """Lower stages took the whole JobConfig and read its attributes: back-edges the import graph cannot
    see. Only job/, commands/ and config.py may read the job's own settings off a `cfg`."""
    import ast
    from pathlib import Path

    import llm_gradprune

    root = Path(llm_gradprune.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("job/", "commands/")) or rel in ("config.py", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in JOB_ONLY
                and getattr(node.value, "id", "") == "cfg"
            ):
                offenders.append(f"{rel}:{node.lineno} cfg.{node.attr}")
            if isinstance(node, ast.ImportFrom) and any(a.name == "JobConfig" for a in node.names):
                offenders.append(f"{rel} imports JobConfig")
    assert offenders == []
