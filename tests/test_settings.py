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


# -- issue 23: settings, YAML and text ----------------------------------------------------------------
@pytest.mark.parametrize("d", [d for d in SETTINGS if d.kind is float], ids=lambda d: d.key)
def test_every_float_setting_refuses_non_finite_values(d):
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ConfigError) as err:
            build(d.key, value)
        assert str(err.value).startswith(f"{d.key} {value!r} must be a finite number"), str(err.value)


def test_a_one_sided_range_reads_as_its_bound():
    for key, value in (("recover_lr", 0.0), ("recover_temperature", 0.0), ("recover_weight_decay", -1.0)):
        with pytest.raises(ConfigError) as err:
            JobConfig.from_flat({key: value})
        bound = "> 0" if key != "recover_weight_decay" else ">= 0"
        assert str(err.value) == f"{key} {value!r} must be {bound}"


def test_numbers_yaml_1_1_reads_as_strings_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string: the config reader takes it as YAML 1.2 does, and a float
    setting takes a string that reads as a number."""
    path = tmp_path / "c.yaml"
    path.write_text("recover_lr: 1e-4\nrecover_weight_decay: 5E-2\nallocation: owl\nowl_lambda: 1e-1\n")
    assert read_yaml(path)["recover_lr"] == 1e-4
    cfg = JobConfig.from_yaml(path)
    got = (cfg.recover.lr, cfg.recover.weight_decay, cfg.prune.allocation_params["lambda"])
    assert got == (1e-4, 0.05, 0.1)
    assert JobConfig.from_flat({"recover_lr": "2e-3"}).recover.lr == 2e-3
    parser, _ = cli.build_parser()  # a YAML flag reads numbers the same way
    args = parser.parse_args(["prune", "--criterion-params", "weight: 1e-1"])
    assert args.criterion_params == {"weight": 0.1}
    with pytest.raises(ConfigError, match=r"^recover_lr 'fast' must be a number > 0$"):
        JobConfig.from_flat({"recover_lr": "fast"})


def test_yaml_refuses_a_key_given_twice_at_any_depth(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("criterion: blend\ncriterion_params:\n  weight: 0.2\n  weight: 0.8\n")
    with pytest.raises(ConfigError, match=r"at line 4: key 'weight' is given twice \(first at line 3\)"):
        read_yaml(path)
    path.write_text("base: &b {sparsity: 0.3}\n")  # anchors and distinct keys still read
    assert read_yaml(path) == {"base": {"sparsity": 0.3}}


def test_a_structured_run_refuses_every_unstructured_setting_given():
    """Even one equal to what its default resolves to (sparsity 0.5, scope row)."""
    for key, value in (("sparsity", 0.5), ("scope", "row"), ("criterion", "fisher")):
        with pytest.raises(ConfigError, match=rf"^{key} {value!r} applies to unstructured pruning"):
            JobConfig.from_flat({"structure": "channels", key: value})
    assert JobConfig.from_flat({"structure": "channels", "threads": 2}).prune.threads == 2


def test_recovery_evaluation_needs_eval():
    for key, value in (("recover_eval_every", 5), ("recover_eval_windows", 4)):
        with pytest.raises(ConfigError, match=rf"^{key} {value} scores held-out perplexity .* pass --eval"):
            JobConfig.from_flat({"recover_steps": 10, key: value})
        JobConfig.from_flat({"recover_steps": 10, "eval": True, key: value})


def test_lora_rank_is_bounded_by_the_narrowest_target():
    from llm_gradprune.recovery.config import check_lora_rank

    widths = {"q_proj": 32, "down_proj": 64}
    check_lora_rank(32, widths)
    check_lora_rank(0, {"x": 1})
    with pytest.raises(ConfigError, match=r"^recover_lora_r 33 is above the width of q_proj \(32\).*<= 32$"):
        check_lora_rank(33, widths)


def test_keep_heads_says_what_its_rounding_did(tmp_path, capsys):
    """0.75 of 4 heads in 2 KV groups can be 4 or 2 heads only: the run says it kept all 4."""
    from .tiny_folder import make_model_folder, make_text_file

    model, text = make_model_folder(tmp_path / "m"), make_text_file(tmp_path / "t.txt")
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "4", "--seq-len", "16",
            "--output-dir", str(tmp_path / "out"), "--no-progress", "--structure", "heads", "--keep-heads", "0.75"]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert (
        "warning: keep_heads 0.75 asks for 3 of 4 query heads, but 2 KV group(s) allow 4, 2, 1 heads per layer: "
        "4 kept, nothing is removed" in err
    ), err
