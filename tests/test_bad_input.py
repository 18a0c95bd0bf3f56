"""The bad-input table: every row exits 2 with one line naming the bad value, and writes nothing.

Each row runs `llm-gradprune prune` in-process (cli.main) on a tiny model folder and text file. Every
row must fail before calibration: `calibrate` is replaced by a function that fails the test if called.
"Nothing written" is checked as: the output folder and the state folder do not exist and every file
and folder under the test's workspace (model, data, output parent) is unchanged (names, sizes, mtimes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_gradprune import commands as cli
from llm_gradprune.calibration import loop

from .tiny_folder import make_model_folder, make_text_file


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"model": make_model_folder(root / "model"), "text": make_text_file(root / "t.txt")}


def snapshot(*roots: Path) -> dict[str, tuple]:
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()  # a symlink loop is a row's input too
            out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# Each setup gets (workspace, assets) and returns the flags that differ from a good run.
def nan_model(ws, a):
    m = _copy_model(a["model"], ws / "nan-model")
    w = load_file(m / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(w, m / "model.safetensors", metadata={"format": "pt"})
    return ["--model", str(m)]


def moe_folder(ws, a):
    """A tiny Mixtral with the tiny Llama's tokenizer: experts are targets."""
    from .families import BY_NAME
    from .tiny_folder import make_tokenizer

    BY_NAME["mixtral"].build().save_pretrained(ws / "moe")
    make_tokenizer().save_pretrained(ws / "moe")
    return ["--model", str(ws / "moe")]


def moe_with(*args):
    return lambda ws, a: [*moe_folder(ws, a), *args]


def family_with(name: str, *args):
    """A tiny model of another family (tests/families.py) with the word tokenizer, and flags."""

    def setup(ws, a):
        from .families import BY_NAME
        from .tiny_folder import make_tokenizer

        BY_NAME[name].build().save_pretrained(ws / name)
        make_tokenizer().save_pretrained(ws / name)
        return ["--model", str(ws / name), *args]

    return setup


def vit_folder(ws, a):
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(ws / "vit")
    return ["--model", str(ws / "vit")]


def bin_only_model(ws, a):
    m = _copy_model(a["model"], ws / "bin-model")
    w = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    torch.save(w, m / "pytorch_model.bin")
    return ["--model", str(m)]


def not_a_model_folder(ws, a):
    (ws / "empty-folder").mkdir()
    return ["--model", str(ws / "empty-folder")]


def empty_text_column(ws, a):
    (ws / "d.csv").write_text("text,label\n" + ",1\n" * 30)
    return ["--dataset", str(ws / "d.csv")]


def wrong_column(ws, a):
    (ws / "d.csv").write_text("review,label\n" + "w1 w2 w3,1\n" * 30)
    return ["--dataset", str(ws / "d.csv")]


def yaml_typo(ws, a):
    (ws / "c.yaml").write_text("num_sample: 4\n")
    return ["--config", str(ws / "c.yaml")]


def yaml_syntax(ws, a):
    (ws / "c.yaml").write_text("include: [mlp\n")
    return ["--config", str(ws / "c.yaml")]


def output_inside_model(ws, a):
    return ["--output-dir", str(a["model"] / "pruned")]


def output_not_empty(ws, a):
    (ws / "out").mkdir()
    (ws / "out" / "keep.txt").write_text("mine")
    return []


def state_without_resume(ws, a):
    state = ws / "out.calib-state" / "step-00000002"
    state.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, state / "stats-00000.safetensors")
    size = (state / "stats-00000.safetensors").stat().st_size
    from llm_gradprune.io.calib_state import STATE_VERSION

    meta = {"version": STATE_VERSION, "batches_done": 2, "files": {"stats-00000.safetensors": size}}
    (state / "state.json").write_text(json.dumps(meta))
    return ["--save-state-every", "2"]


def _saved_state(ws, a):
    """A real calibration state of the good run (2 of 4 batches done), as a killed run leaves it."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gradprune.calibration.data import micro_batches
    from llm_gradprune.calibration.loop import gather_statistics
    from llm_gradprune.config import JobConfig
    from llm_gradprune.job.transforms import Prune
    from llm_gradprune.plan import make_plan

    model_dir = _copy_model(a["model"], ws / "model")
    text = ws / "t.txt"
    text.write_bytes(a["text"].read_bytes())
    cfg = JobConfig.from_flat({"model": str(model_dir), "dataset": str(text), "num_samples": 4, "seq_len": 16,
                               "output_dir": str(ws / "out"), "save_state_every": 2, "progress": False})  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    from llm_gradprune.job.inputs import calibration_samples

    blocks = calibration_samples(cfg, AutoTokenizer.from_pretrained(model_dir))
    plan = make_plan(model, cfg.prune, resume=True)
    ckpt = Prune().calibration_state(SimpleNamespace(cfg=cfg, model=model, samples=blocks))
    gather_statistics(model, micro_batches(blocks, 1)[:2], plan.whole_stats, plan.targets, calib_state=ckpt,
                      progress=False)  # fmt: skip
    return ["--model", str(model_dir), "--dataset", str(text), "--save-state-every", "2", "--resume"]


def resume_config_changed(ws, a):
    return [*_saved_state(ws, a), "--seed", "1", "--batch-size", "2"]


def resume_model_changed(ws, a):
    args = _saved_state(ws, a)
    w = load_file(ws / "model" / "model.safetensors")
    w["model.layers.0.mlp.up_proj.weight"][0, 0] += 1.0  # element 0 is always in the fingerprint
    save_file(w, ws / "model" / "model.safetensors", metadata={"format": "pt"})
    return args


def resume_data_changed(ws, a):
    args = _saved_state(ws, a)
    make_text_file(ws / "t.txt", seed=7)
    return args


def empty_txt(ws, a):
    (ws / "empty.txt").write_text("")
    return ["--dataset", str(ws / "empty.txt")]


def one_row_txt(ws, a):
    (ws / "one.txt").write_text("w1 w2 w3\n")
    return ["--dataset", str(ws / "one.txt")]


def hub_dataset_offline(ws, a):
    import datasets.config
    import huggingface_hub.constants

    for module in (huggingface_hub.constants, datasets.config):  # no network wait in tests
        UNDO.append(lambda m=module, v=module.HF_HUB_OFFLINE: setattr(m, "HF_HUB_OFFLINE", v))
        module.HF_HUB_OFFLINE = True
    return ["--dataset", "no-such-org/no-such-data"]


def unwritable_parent(ws, a):
    """A parent folder nobody may create folders in (root ignores permission bits: immutable instead)."""
    locked = ws / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is unavailable: cannot make a folder unwritable")
        UNDO.append(lambda: subprocess.run(["chattr", "-i", str(locked)], check=True))
    else:
        locked.chmod(0o555)
    return ["--output-dir", str(locked / "sub" / "out")]


def config_file(content: str | bytes):
    def setup(ws, a):
        (ws / "c.yaml").write_bytes(content.encode() if isinstance(content, str) else content)
        return ["--config", str(ws / "c.yaml")]

    return setup


def config_loop(ws, a):
    (ws / "a.yaml").symlink_to(ws / "b.yaml")
    (ws / "b.yaml").symlink_to(ws / "a.yaml")
    return ["--config", str(ws / "a.yaml")]


def config_folder(ws, a):
    (ws / "conf").mkdir()
    return ["--config", str(ws / "conf")]


def numbers_as_text(ws, a):
    (ws / "d.jsonl").write_text("".join(f'{{"text": {i + 1}}}\n' for i in range(30)))
    return ["--dataset", str(ws / "d.jsonl")]


UNDO: list = []  # what a setup changed outside its workspace, undone after its row


def flags(*args):
    return lambda ws, a: list(args)


ROWS = [
    ("sparsity-1", flags("--sparsity", "1.0"), r"sparsity 1\.0 is outside \[0, 1\)"),
    ("sparsity-negative", flags("--sparsity", "-0.1"), r"sparsity -0\.1 is outside \[0, 1\)"),
    ("nm-n-ge-m", flags("--pattern", "4:4"), r"pattern '4:4' is not allowed: N:M needs 0 < N < M"),
    ("nm-m-not-dividing-rows", flags("--pattern", "2:5"),
     r"pattern '2:5' does not fit model\.layers\.0\.self_attn\.q_proj\.weight: its rows hold 32 weights, not a multiple of 5"),
    ("unknown-criterion", flags("--criterion", "snip"), r"criterion 'snip' is unknown: choose one of magnitude"),
    ("unknown-scope", flags("--scope", "layer"), r"scope 'layer' is unknown: choose one of tensor, row, global"),
    ("unknown-pattern", flags("--pattern", "2-4"), r"pattern '2-4' is not allowed: use 'unstructured' or 'N:M'"),
    ("calibration-with-0-samples", flags("--criterion", "taylor", "--num-samples", "0"),
     r"criterion 'taylor' needs calibration data but num_samples is 0"),
    ("model-missing", flags("--model", "/nonexistent/model"), r"model '/nonexistent/model' does not exist"),
    ("model-unknown-builtin", flags("--model", "builtin:gpt5"), r"unknown built-in model 'builtin:gpt5'"),
    ("model-folder-without-config", not_a_model_folder, r"empty-folder' has no config\.json"),
    ("model-not-causal-lm", vit_folder, r"\(ViTConfig\) is not a causal language model"),
    ("model-only-pickled-bin", bin_only_model, r"has no loadable safetensors weights \(pickled \.bin files are never loaded\)"),
    ("model-nan-weights", nan_model, r"has NaN/inf values in model\.layers\.1\.mlp\.down_proj\.weight"),
    ("too-little-text", flags("--num-samples", "500"), r"holds \d+ tokens: enough for \d+ blocks of 16, but num_samples asks for 500"),
    ("dataset-missing", flags("--dataset", "/nonexistent/d.txt"), r"dataset file '/nonexistent/d\.txt' does not exist"),
    ("empty-text-column", empty_text_column, r"d\.csv\[train\]' holds no non-empty text"),
    ("wrong-text-column", wrong_column, r"text_column 'text' is not in .*: its columns are review, label"),
    ("patterns-match-nothing", flags("--include", "no_such_layer"), r"target patterns match no prunable matrix \(include=\['no_such_layer'\]"),
    ("bad-regex", flags("--exclude", "mlp("), r"target pattern 'mlp\(' is not a valid regex"),
    ("yaml-unknown-key", yaml_typo, r"unknown config key 'num_sample' \(did you mean 'num_samples'\?\)"),
    ("yaml-syntax-error", yaml_syntax, r"c\.yaml' is not valid YAML at line 2: expected ',' or ']'"),
    ("seq-len-over-context", flags("--seq-len", "512"), r"seq_len 512 is larger than the model's context of 256 tokens"),
    ("output-inside-model", output_inside_model, r"output_dir '.*model/pruned' is inside the model's own folder"),
    ("output-not-empty", output_not_empty, r"output_dir '.*out' is not empty: pass --overwrite to replace it"),
    ("save-state-every-negative", flags("--save-state-every", "-1"), r"save_state_every -1 must be an integer >= 0"),
    ("resume-config-changed", resume_config_changed,
     r"cannot resume '.*step-00000002': the config differs from the saved run \(batch_size 1 -> 2, seed 0 -> 1\)"),
    ("resume-model-changed", resume_model_changed, r"cannot resume '.*': the model's weights differ from the saved run"),
    ("resume-data-changed", resume_data_changed, r"cannot resume '.*': the calibration tokens differ from the saved run"),
    ("state-without-resume", state_without_resume, r"holds a calibration saved at batch 2: pass --resume"),
    ("empty-txt", empty_txt, r"dataset file '.*empty\.txt' is empty$"),
    ("one-row-txt", one_row_txt,
     r"one\.txt' holds 1 row\(s\), and every 10th row \(row 0, 10, \.\.\.\) is held out for evaluation, so its 'train' part is empty"),
    ("hub-dataset-offline", hub_dataset_offline,
     r"dataset 'no-such-org/no-such-data' could not be reached at .* \(HF_HUB_OFFLINE is set\) and is not in the local cache"),
    ("output-parent-unwritable", unwritable_parent, r"output_dir '.*locked/sub/out' cannot be written: no write permission in '.*locked'"),
    ("max-shard-size", flags("--max-shard-size", "abc"), r"max_shard_size 'abc' is not a size: use a number of bytes or e\.g\. 500MB"),
    ("criterion-param-type", flags("--criterion", "blend", "--criterion-params", "weight: abc"),
     r"criterion 'blend' parameter weight 'abc' must be a number"),
    ("criterion-param-flag-type", flags("--criterion", "blend", "--blend-weight", "abc"),
     r"argument --blend-weight: invalid float value: 'abc'"),
    ("param-of-another-criterion", flags("--criterion", "fisher", "--gblm-alpha", "5"),
     r"gblm_alpha applies to criterion 'gblm', but the criterion is 'fisher'"),
    ("device-missing", flags("--device", "cuda"), r"device 'cuda' is not available: this machine has no CUDA device"),
    ("device-bad-name", flags("--device", "gpu0"), r"device 'gpu0' is not a device name"),
    ("owl-lambda-too-wide", flags("--allocation", "owl", "--owl-lambda", "0.9"),
     r"allocation 'owl' parameter lambda 0\.9 lets a layer's sparsity leave \[0, 1\) around sparsity 0\.5"),
    ("nm-with-other-sparsity", flags("--pattern", "2:4", "--sparsity", "0.3"),
     r"sparsity 0\.3 conflicts with pattern 2:4, which fixes it at 0\.5: drop sparsity"),
    ("sparsegpt-with-scope", flags("--criterion", "sparsegpt", "--scope", "global"),
     r"scope 'global' does not apply to criterion 'sparsegpt', which prunes an exact share of every column block"),
    ("value-type", flags("--sparsity", "abc"), r"argument --sparsity: invalid float value: 'abc'"),
    ("flag-typo", flags("--sparsityy", "0.3"), r"unrecognized arguments: --sparsityy 0\.3 \(did you mean --sparsity\?\)"),
    ("layer-wise-option-outside", flags("--blocksize", "64"), r"blocksize 64 applies to layer-wise mode only"),
    ("no-gradient-to-accumulate", flags("--criterion", "wanda", "--grad-accum", "2"),
     r"grad_accum 2 averages gradients, but criterion 'wanda' reads no gradient statistics"),
    ("lr-huge", flags("--recover-steps", "1", "--recover-lr", "1e38"), r"recover_lr 1e\+38 is above 1: AdamW would diverge at once"),
    ("lora-r-over-width", flags("--recover-steps", "1", "--recover-lora-r", "33"), r"recover_lora_r 33 is above the width of model\.layers\.0\.self_attn\.k_proj \(16\)"),
    ("lora-on-experts", moe_with("--recover-steps", "2", "--recover-lora-r", "4"),
     r"recover lora_r adds LoRA adapters to nn\.Linear layers, and model\.layers\.0\.mlp\.experts\.0\.gate_up_proj is not one \(MixtralExperts\): train the weights themselves \(lora_r 0\)"),
    ("moe-patterns-match-nothing", moe_with("--include", "experts\\.9\\."),
     r"target patterns match no prunable matrix \(include=\['experts\\\\.9\\\\.'\]"),
    # issue 23: settings, YAML and text
    ("lr-inf", flags("--recover-steps", "1", "--recover-lr", "inf"), r"recover_lr inf must be a finite number > 0$"),
    ("lr-nan", flags("--recover-steps", "1", "--recover-lr", "nan"), r"recover_lr nan must be a finite number > 0$"),
    ("param-nan", flags("--allocation", "owl", "--owl-lambda", "nan"),
     r"allocation 'owl' parameter lambda nan must be a finite number$"),
    ("yaml-empty", config_file("# nothing yet\n"), r"config file '.*c\.yaml' is empty: it holds no settings$"),
    ("eval-tasks-empty", flags("--eval-tasks", ""), r"eval_tasks \[''\] names no task: give names such as boolq"),
    ("eval-every-without-eval", flags("--recover-steps", "2", "--recover-eval-every", "1"),
     r"recover_eval_every 1 scores held-out perplexity during recovery, which runs only with eval: pass --eval"),
    ("structure-with-sparsity-0.5", flags("--structure", "channels", "--sparsity", "0.5"),
     r"sparsity 0\.5 applies to unstructured pruning, but structure 'channels' removes whole units"),
    ("yaml-duplicate-key", config_file("sparsity: 0.3\nsparsity: 0.6\n"),
     r"c\.yaml' is not valid YAML at line 2: key 'sparsity' is given twice \(first at line 1\): give it once$"),
    ("text-not-string", numbers_as_text, r"text_column 'text' of '.*d\.jsonl' holds int \d+ at row \d+, not text"),
    ("yaml-not-utf8", config_file(b"sparsity: 0.3\n# caf\xe9\n"), r"c\.yaml' is not UTF-8 text: byte 0xe9 at line 2$"),
    ("lr-zero", flags("--recover-lr", "0"), r"recover_lr 0\.0 must be > 0$"),
    ("temperature-zero", flags("--recover-temperature", "0"), r"recover_temperature 0\.0 must be > 0$"),
    ("lr-negative-exponent", flags("--recover-lr", "-1e-4"), r"recover_lr -0\.0001 must be > 0$"),
    ("config-symlink-loop", config_loop, r"config file '.*a\.yaml' is a symlink loop$"),
    ("config-is-a-folder", config_folder, r"config file '.*conf' is a folder, not a YAML file$"),
    ("yaml-flag-syntax", flags("--criterion-params", "a: [1"),
     r"argument --criterion-params: 'a: \[1' is not valid YAML: expected ',' or '\]'"),
    ("model-is-a-file", lambda ws, a: ["--model", str(a["text"])], r"model '.*t\.txt' is a file, not a model folder"),
    # issue 24: structured pruning across families, expert removal
    ("structured-family-refused", family_with("gpt_neox", "--structure", "channels"),
     r"structured pruning needs q/k/v/o \(or qkv\) attention projections and gated gate/up/down \(or gate_up\) MLPs in "
     r"every layer; GPTNeoXForCausalLM: layer 0 has attention\.query_key_value, which is none of these$"),
    ("heads-with-a-norm-across-heads", family_with("olmo2", "--structure", "heads"),
     r"structure heads cannot remove heads of Olmo2ForCausalLM: model\.layers\.0's q_norm\.weight \(32,\) is per head"),
    ("experts-on-a-dense-model", flags("--structure", "experts"),
     r"structure 'experts' removes routed experts, but LlamaForCausalLM has no MoE layer$"),
    ("keep-experts-below-top-k", moe_with("--structure", "experts", "--keep-experts", "0.25"),
     r"keep_experts 0\.25 keeps 1 of 4 experts per layer, fewer than the 2 each token is routed to \(num_experts_per_tok\)$"),
    ("experts-target-unreachable", moe_with("--structure", "experts", "--target-params", "0.2"),
     r"structure 'experts' can remove at most 44\.\d% of the decoder parameters, but target_params 0\.2 asks for 80\.0%"),
    # issue 25: offload
    ("offload-whole-model-criterion", flags("--offload", "disk"),
     r"offload 'disk' applies to layer-wise runs \(criterion sparsegpt, reconstruct obs/lsq, or sequential: true\), "
     r"not to criterion 'token_fisher' with the whole model at once$"),
    ("offload-with-eval", flags("--criterion", "sparsegpt", "--offload", "cpu", "--eval"),
     r"eval with offload 'cpu' is not supported: eval scores perplexity the whole model at once"),
    ("offload-disk-converted-checkpoint", moe_with("--criterion", "sparsegpt", "--offload", "disk"),
     r"offload 'disk' reads each block's tensors by name, but moe holds no model\.layers\.0\.mlp\.gate\.weight "
     r"\(the model converts its checkpoint on load\): use --offload cpu$"),
    ("keep-channels-keeps-none", moe_with("--structure", "channels", "--keep-channels", "0.05"),
     r"keep_channels 0\.05 keeps no channel of 64 \(intermediate_size, in multiples of 8\)$"),
]  # fmt: skip


@pytest.mark.parametrize("setup,message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    setup, message, assets, tmp_path, capsys, monkeypatch
):
    def no_calibration(*a, **k):
        raise AssertionError("calibration started before the bad input was refused")

    ws = tmp_path
    extra = setup(ws, assets)
    monkeypatch.setattr(loop, "calibrate", no_calibration)
    args = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--num-samples", "4",
            "--seq-len", "16", "--output-dir", str(ws / "out"), "--no-progress", *extra]  # fmt: skip
    before = snapshot(ws, assets["model"])
    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own errors (type, unknown flag): still one line
        code = exc.code
    finally:
        while UNDO:
            UNDO.pop()()
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("llm-gradprune: error: ")
    assert re.search(message, err), err
    assert snapshot(ws, assets["model"]) == before  # nothing created, changed or removed


def test_unreachable_hub_model_is_one_line(assets, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait in tests
    before = snapshot(tmp_path)
    assert cli.main(["prune", "--model", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "o"),
                     "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert (
        "model 'no-such-org/no-such-model' could not be reached at https://huggingface.co (HF_HUB_OFFLINE is set)"
        in err
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("tasks", [[""], []], ids=["empty-name", "no-name"])
def test_eval_tasks_naming_nothing_is_refused(tasks, assets, capsys):
    """`eval --tasks ''` (or a bare --tasks) used to score perplexity instead, silently."""
    before = snapshot(assets["model"])
    capsys.readouterr()
    code = cli.main(["eval", str(assets["model"]), "--dataset", str(assets["text"]), "--tasks", *tasks])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llm-gradprune: error: "), err
    assert re.search(r"names no task: give names such as boolq", err), err
    assert snapshot(assets["model"]) == before
