"""Settings declared once (`fields.setting`): the validator enforces what a field declares (choices,
range, type, refusals), the commands take what its metadata says, the resume identity leaves out run
control, and YAML and flags use one flat key per setting."""

import math

import pytest
import yaml

from llm_gradprune import commands as cli
from llm_gradprune.commands.flags import fields_of
from llm_gradprune.config import JobConfig, RecoverConfig, flat_settings, read_yaml
from llm_gradprune.errors import ConfigError
from llm_gradprune.fields import Range
from llm_gradprune.structured.config import StructureConfig

SETTINGS = [d for _, d in flat_settings()]
OWNER = {d.key: cls for cls, d in flat_settings()}


def build(key, value):
    """A job with one setting changed (a structure setting alongside the structure it needs)."""
    extra = {"structure": "channels"} if OWNER[key] is StructureConfig and key != "structure" else {}
    return JobConfig.from_flat({**extra, key: value})


def test_flat_keys_are_unique_and_name_their_config():
    keys = [d.key for d in SETTINGS]
    assert len(keys) == len(set(keys))
    assert all(d.key.startswith("recover_") == (OWNER[d.key] is RecoverConfig) for d in SETTINGS)


@pytest.mark.parametrize("d", [d for d in SETTINGS if d.spec.choices], ids=lambda d: d.key)
def test_choices_are_enforced_for_every_field_that_declares_them(d):
    choices = d.spec.choices()
    with pytest.raises(ConfigError) as err:
        build(d.key, "no_such_value")
    assert str(err.value) == f"{d.key} 'no_such_value' is unknown: choose one of {', '.join(choices)}"
    build(d.key, choices[0])  # a declared choice is taken


def outside(rng: Range, kind: type) -> list:
    """Values just outside `rng`, of the setting's own type."""
    step = 1 if kind is int else 0.5
    values = [rng.low if rng.low_open else rng.low - step]
    if rng.high != math.inf:
        values.append(rng.high if rng.high_open else rng.high + step)
    return [kind(v) for v in values]


@pytest.mark.parametrize("d", [d for d in SETTINGS if d.spec.range], ids=lambda d: d.key)
def test_ranges_are_refused_with_the_value_named(d):
    for value in outside(d.spec.range, d.kind):
        with pytest.raises(ConfigError) as err:
            build(d.key, value)
        message, rng = str(err.value), d.spec.range
        assert message.startswith(f"{d.key} {value!r} "), message
        assert message.endswith((f"is outside {rng.interval}", rng.phrase)), message


def test_types_are_checked_in_one_line():
    cases = [
        ("sparsity", "abc", "sparsity 'abc' must be a number in [0, 1)"),
        ("recover_lr", True, "recover_lr True must be a number > 0"),
        ("num_samples", 2.5, "num_samples 2.5 must be an integer >= 0"),
        ("eval", "yes", "eval 'yes' must be true or false"),
        ("recover_bf16", 1, "recover_bf16 1 must be true or false"),
        ("criterion_params", [1], "criterion_params [1] must map names to values"),
        ("include", 3, "include 3 must be a list"),
    ]
    for key, value, message in cases:
        with pytest.raises(ConfigError) as err:
            JobConfig.from_flat({key: value})
        assert str(err.value) == message
    cfg = JobConfig.from_flat({"include": "mlp", "recover_lr": 1, "recover_bf16": None})
    assert cfg.prune.include == ["mlp"] and cfg.recover.lr == 1.0 and isinstance(cfg.recover.lr, float)


def test_refused_unless_names_the_setting_and_what_it_needs():
    cases = {
        "push_private": (True, "push_private True applies only with push_to_hub"),
        "push_revision": ("exp", "push_revision 'exp' applies only with push_to_hub"),
        "recover_teacher": ("t", "recover_teacher 't' is used only with recover_distill_alpha > 0"),
        "scores_dir": ("/tmp/s", "scores_dir '/tmp/s' is used only by the unstructured global scope"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError) as err:
            JobConfig.from_flat({key: value})
        assert str(err.value) == message
    ok = JobConfig.from_flat({"push_to_hub": "a/b", "push_private": True, "recover_distill_alpha": 0.5,
                              "recover_teacher": "t", "scope": "global", "scores_dir": "/tmp/s"})  # fmt: skip
    assert ok.push_private and ok.recover.teacher == "t" and ok.prune.scores_dir == "/tmp/s"


def test_range_parses_and_reads_as_written():
    assert Range.parse("[0, 1)").interval == "[0, 1)" and Range.parse("(0, 10]").phrase == "in (0, 10]"
    assert Range.parse(">= 1").phrase == ">= 1" and Range.parse("> 0").interval == "(0, inf)"
    assert 0 in Range.parse("[0, 1)") and 1 not in Range.parse("[0, 1)") and 0 not in Range.parse("> 0")
    with pytest.raises(ValueError):
        Range.parse("0..1")


# -- where a setting applies -------------------------------------------------------------------------
# the hand-written lists the metadata replaced (commands/eval.py FIELDS, commands/recover.py JOB_FIELDS +
# TRAIN_FIELDS, io/calib_state.py RUN_CONTROL, config.py STRUCTURED_PRUNE_KEYS)
OLD_EVAL = {"dataset", "dataset_config", "text_column", "seed", "dtype", "trust_remote_code", "eval_split",
            "eval_num_samples", "eval_seq_len", "eval_batch_size", "eval_stride", "device", "progress",
            "eval_tasks", "eval_tasks_include_path", "eval_tasks_limit", "eval_tasks_fewshot"}  # fmt: skip
OLD_RECOVER_JOB = {"dataset", "dataset_config", "split", "text_column", "dtype", "trust_remote_code", "device",
                   "eval", "eval_split", "eval_num_samples", "eval_seq_len", "eval_batch_size", "eval_stride",
                   "output_dir", "overwrite", "max_shard_size", "resume", "progress"}  # fmt: skip
OLD_RUN_CONTROL = {"output_dir", "overwrite", "progress", "save_state_every", "resume", "state_dir", "device",
                   "max_shard_size", "select_chunk_elems", "eval", "eval_split", "eval_num_samples", "eval_seq_len",
                   "eval_batch_size", "eval_stride", "allow_empty_tensors", "eval_tasks", "eval_tasks_include_path",
                   "eval_tasks_limit", "eval_tasks_fewshot", "threads", "push_to_hub", "push_private",
                   "push_revision"}  # fmt: skip


def test_commands_take_the_settings_their_old_lists_named():
    train = {d.key for d in SETTINGS if OWNER[d.key] is RecoverConfig} - {"recover_round_steps"}
    assert {d.key for d in fields_of("eval")} == OLD_EVAL
    assert {d.key for d in fields_of("recover")} == OLD_RECOVER_JOB | train
    assert {d.key for d in fields_of("prune")} == {d.key for d in SETTINGS}
    assert {d.field.name for _, d in flat_settings() if d.spec.structured} == {"threads", "progress"}


def options(command):
    _, parsers = cli.build_parser()
    return {o for a in parsers[command]._actions for o in a.option_strings}


def test_save_state_every_has_one_meaning_per_flag():
    """--save-state-every counts calibration batches (prune); training steps are --recover-save-state-every."""
    assert {"--save-state-every", "--recover-save-state-every"} <= options("prune")
    recover = options("recover")
    assert "--recover-save-state-every" in recover and "--save-state-every" not in recover
    assert {"--recover-steps", "--recover-lr", "--recover-seq-len"} <= recover
    assert not {"--steps", "--lr", "--seq-len", "--batch-size"} & recover
    assert {"--push-private", "--push-revision", "--repo-id"} <= options("push")
    assert not {"--private", "--revision"} & options("push")


def test_identity_leaves_out_run_control_and_recovery_unless_asked():
    cfg = JobConfig.from_flat({"criterion": "fisher", "recover_steps": 3})
    plain, full = cfg.identity(), cfg.identity(with_recovery=True)
    run_control = {d.key for d in SETTINGS if d.spec.run_control}
    assert run_control - {k for k in run_control if k.startswith("recover_")} == OLD_RUN_CONTROL
    assert not run_control & set(plain) and not run_control & set(full)
    assert not any(k.startswith("recover_") for k in plain)
    assert {k for k in full if k not in plain} == {
        d.key for d in SETTINGS if OWNER[d.key] is RecoverConfig
    } - (run_control)
    assert full["recover_steps"] == 3 and plain["criterion"] == "fisher"
    # a changed lr is a different training run; a changed output folder or save interval is not
    lr = JobConfig.from_flat({"criterion": "fisher", "recover_steps": 3, "recover_lr": 1e-3})
    assert lr.identity() == plain and lr.identity(with_recovery=True) != full
    moved = JobConfig.from_flat({"criterion": "fisher", "recover_steps": 3, "output_dir": "elsewhere",
                                 "recover_save_state_every": 2, "save_state_every": 5})  # fmt: skip
    assert moved.identity(with_recovery=True) == full


# -- one flat convention -----------------------------------------------------------------------------
def test_recovery_settings_are_flat_in_yaml_and_a_legacy_section_still_reads(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("criterion: fisher\nrecover_steps: 6\nrecover_lr: 0.003\nrecover_batch_size: 2\n")
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("criterion: fisher\nrecover:\n  steps: 6\n  lr: 0.003\n  batch_size: 2\n")
    a, b = JobConfig.from_yaml(flat), JobConfig.from_yaml(legacy)
    assert a == b and a.recover.steps == 6 and a.recover.lr == 0.003
    a.save_yaml(tmp_path / "again.yaml")
    written = yaml.safe_load((tmp_path / "again.yaml").read_text())
    assert "recover" not in written and written["recover_lr"] == 0.003
    assert JobConfig.from_yaml(tmp_path / "again.yaml") == a


def test_a_recovery_setting_given_both_ways_is_refused_and_flags_beat_a_legacy_section(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^recover_lr is given twice, as recover_lr and in the recover section"
    ):
        JobConfig.from_flat({"recover_lr": 0.1, "recover": {"lr": 0.2}})
    with pytest.raises(ConfigError, match=r"unknown recover key 'sterps' \(did you mean 'steps'\?\)"):
        JobConfig.from_flat({"recover": {"sterps": 2}})
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("recover:\n  steps: 6\n  lr: 0.003\n")
    assert read_yaml(legacy) == {"recover_steps": 6, "recover_lr": 0.003}
    from llm_gradprune.commands.prune import config_from_args

    parser, _ = cli.build_parser()
    cfg = config_from_args(parser.parse_args(["prune", "--config", str(legacy), "--recover-lr", "0.01"]))
    assert (cfg.recover.steps, cfg.recover.lr) == (6, 0.01)


def test_recover_command_reads_the_same_flat_keys():
    from llm_gradprune.commands.recover import config_from_args

    parser, _ = cli.build_parser()
    args = parser.parse_args(["recover", "some/folder", "--recover-steps", "5", "--recover-lr", "0.003",
                              "--recover-seq-len", "16", "--recover-save-state-every", "2", "--resume"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.model, cfg.recover.steps, cfg.recover.lr, cfg.recover.seq_len) == (
        "some/folder",
        5,
        0.003,
        16,
    )
    assert (cfg.recover.save_state_every, cfg.save_state_every, cfg.resume) == (2, 0, True)
