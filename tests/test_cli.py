"""The command line: flags generated from the config, grouped help, flags beat YAML, one-line errors with a
"did you mean" for typos, --version, python -m llm_gradprune, and the README's accelerate launch path."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_gradprune import JobConfig, PruneConfig
from llm_gradprune import commands as cli
from llm_gradprune.commands.prune import config_from_args
from llm_gradprune.config import param_aliases

ROOT = Path(__file__).resolve().parents[1]


def prune_args(*argv):
    parser, _ = cli.build_parser()
    return parser.parse_args(["prune", *argv])


def test_help_lists_every_option_once_with_its_default_and_in_groups(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    out = capsys.readouterr().out
    from llm_gradprune.config import flat_settings
    from llm_gradprune.recovery.config import RecoverConfig
    from llm_gradprune.structured.config import StructureConfig

    fields = [f for f in dataclasses.fields(JobConfig) if f.name not in ("prune", "recover", "structured")]
    for f in fields + list(dataclasses.fields(PruneConfig)) + list(dataclasses.fields(StructureConfig)):
        assert "--" + f.name.replace("_", "-") in out, f.name
    for f in dataclasses.fields(RecoverConfig):
        assert "--recover-" + f.name.replace("_", "-") in out, f.name
    assert len(flat_settings()) == len(fields) + sum(
        len(dataclasses.fields(c)) for c in (PruneConfig, StructureConfig, RecoverConfig)
    )
    for key in param_aliases():
        assert "--" + key.replace("_", "-") in out, key
    flat = " ".join(out.split())
    assert "(default: token_fisher)" in flat and flat.count("(default: default: ") == 0
    for title in ("model and data:", "method:", "method parameters:", "calibration:", "layer-wise:",
                  "evaluation:", "recovery:", "output:", "distributed:", "resume:"):  # fmt: skip
        assert title in out, title
    for line in out.splitlines():  # one "(default: ...)" per option at most
        assert line.count("(default:") <= 1, line


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"num_samples": 8, "criterion": "taylor", "include": ["mlp"]}))
    cfg = config_from_args(prune_args("--config", str(path), "--num-samples", "3", "--no-progress"))
    assert (cfg.num_samples, cfg.prune.criterion, cfg.prune.include, cfg.prune.progress) == (
        3,
        "taylor",
        ["mlp"],
        False,
    )


def test_parameter_flags_reach_the_criterion_and_the_allocation():
    cfg = config_from_args(prune_args("--criterion", "gblm", "--gblm-alpha", "5", "--allocation", "owl",
                                      "--owl-lambda", "0.1"))  # fmt: skip
    assert cfg.prune.criterion_params == {"alpha": 5.0}
    assert cfg.prune.allocation_params == {"m": 5.0, "lambda": 0.1}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--sparsity", "abc"], "argument --sparsity: invalid float value: 'abc'"),
        (["prune", "--sparsityy", "0.3"], "unrecognized arguments: --sparsityy 0.3 (did you mean --sparsity?)"),
        (["prune", "--criterion", "snip"], "criterion 'snip' is unknown: choose one of magnitude"),
        (["prune", "--gblm-alpha", "2"], "gblm_alpha applies to criterion 'gblm', but the criterion is 'token_fisher'"),
        (["prune", "--criterion", "blend", "--criterion-params", "weight: abc"],
         "criterion 'blend' parameter weight 'abc' must be a number"),
        (["prune", "--blend-weight", "abc"], "argument --blend-weight: invalid float value: 'abc'"),
        (["prune", "--max-shard-size", "abc"], "max_shard_size 'abc' is not a size"),
        (["eval", "x", "--num-samples", "3"], "unrecognized arguments: --num-samples 3 (did you mean --eval-num-samples?)"),
        (["prunee"], "argument command: invalid choice: 'prunee'"),
    ],
)  # fmt: skip
def test_a_bad_command_line_is_one_line(argv, message, capsys, tmp_path):
    code = None
    try:
        code = cli.main([*argv, "--output-dir", str(tmp_path / "o")] if argv[0] == "prune" else argv)
    except SystemExit as err:
        code = err.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llm-gradprune: error: "), err
    assert message in err, err
    assert not (tmp_path / "o").exists()


def test_version_and_python_dash_m(capsys):
    from llm_gradprune import __version__

    with pytest.raises(SystemExit) as err:
        cli.main(["--version"])
    assert err.value.code == 0 and capsys.readouterr().out.strip() == f"llm-gradprune {__version__}"
    proc = subprocess.run([sys.executable, "-m", "llm_gradprune", "--version"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == f"llm-gradprune {__version__}"


def test_unknown_yaml_key_suggests_nearest(tmp_path):
    from llm_gradprune.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("num_sample: 4\n")
    with pytest.raises(
        ConfigError, match="unknown config key 'num_sample' \\(did you mean 'num_samples'\\?\\)"
    ):
        JobConfig.from_yaml(path)


def test_saved_config_round_trips(tmp_path):
    cfg = JobConfig.from_flat({"criterion": "blend", "pattern": "4:8", "blend_grad": 1.0, "num_samples": 8})
    cfg.save_yaml(tmp_path / "p.yaml")
    again = JobConfig.from_yaml(tmp_path / "p.yaml")
    assert again.to_flat() == cfg.to_flat() and again.prune.nm == (4, 8)
    assert again.prune.criterion_params == {"weight": 1.0, "act": 1.0, "grad": 1.0}
    for kw in ({"criterion": "sparsegpt", "pattern": "2:4"}, {"reconstruct": "lsq", "scope": "global"},
               {"allocation": "owl"}):  # fmt: skip
        cfg = JobConfig.from_flat(kw)
        cfg.save_yaml(tmp_path / "q.yaml")
        assert JobConfig.from_yaml(tmp_path / "q.yaml").to_flat() == cfg.to_flat()


def test_job_and_method_settings_are_apart():
    """The library config carries no job field (paths, data, Hub); the job holds one PruneConfig."""
    job_only = {"model", "dataset", "output_dir", "num_samples", "seq_len", "state_dir", "max_shard_size"}
    assert not job_only & {f.name for f in dataclasses.fields(PruneConfig)}
    # one flat set of settings splits in two: the method's into `prune`, the job's onto the job
    cfg = JobConfig.from_flat({"criterion": "taylor", "sparsity": 0.3, "num_samples": 8, "seq_len": 64})
    assert (cfg.prune.criterion, cfg.prune.sparsity, cfg.num_samples, cfg.seq_len) == ("taylor", 0.3, 8, 64)


@pytest.mark.slow
def test_builtin_smollm2_through_accelerate_launch(tmp_path):
    """The README's path: accelerate launch scripts/prune_llama.py on the built-in model and data."""
    out = tmp_path / "smollm2"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "prune_llama.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--num-samples", "4", "--seq-len", "64", "--criterion", "taylor", "--scope", "row",
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint:" in proc.stdout and "50.0000%" in proc.stdout
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["calibration"]["tokens"] == 4 * 64 and report["verified"]
    assert yaml.safe_load((out / "prune_config.yaml").read_text())["criterion"] == "taylor"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    for name, info in report["per_tensor"].items():
        w = params[name]
        assert int((w == 0).sum()) == info["zeros"]
        assert ((w == 0).sum(1) >= w.shape[1] // 2).all()  # per row: at least half (plus packed zeros)
    assert report["targets"] == 210 and report["target_weights"] == 106_168_320
