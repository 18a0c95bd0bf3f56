"""The CLI is generated from the config: every key is a flag, flags beat YAML, bad values exit 2."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_gradprune import cli
from llm_gradprune.config import ConfigError, PruneConfig

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(PruneConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "default: 'token_fisher'" in " ".join(out.split())


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"num_samples": 8, "criterion": "taylor", "include": ["mlp"]}))
    args = cli.build_parser().parse_args(
        ["prune", "--config", str(path), "--num-samples", "3", "--no-progress"]
    )
    cfg = cli.config_from_args(args)
    assert (cfg.num_samples, cfg.criterion, cfg.include, cfg.progress) == (3, "taylor", ["mlp"], False)


def test_unknown_yaml_key_suggests_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_sample: 4\n")
    with pytest.raises(
        ConfigError, match="unknown config key 'num_sample' \\(did you mean 'num_samples'\\?\\)"
    ):
        PruneConfig.from_yaml(path)


def test_bad_value_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["prune", "--criterion", "snip", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'snip'" in err
    assert not (tmp_path / "o").exists()


def test_saved_config_round_trips(tmp_path):
    cfg = PruneConfig(criterion="blend", pattern="4:8", blend={"grad": 1.0})
    cfg.save_yaml(tmp_path / "p.yaml")
    again = PruneConfig.from_yaml(tmp_path / "p.yaml")
    assert again.to_dict() == cfg.to_dict() and again.nm == (4, 8)


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
