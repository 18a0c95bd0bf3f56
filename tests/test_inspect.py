"""`inspect`: exact counts on hand-made tensors and checkpoints, a 2:4 output of `prune`, one-line errors,
a Hub id through the fake Hub (only the index and its shards are fetched), and bounded memory on a
4-shard checkpoint (measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from llm_gradprune import commands as cli
from llm_gradprune.io.inspect import TensorStats, fold_chunks, inspect_checkpoint

from .hub_server import FakeHub
from .tiny_folder import ROOT, make_model_folder, make_text_file


def known_tensors() -> dict[str, torch.Tensor]:
    """Tensors whose counts are worked out by hand in the comments."""
    a = torch.ones(4, 8)
    a[0] = 0  # one all-zero row
    a[:, 3] = 0  # one all-zero column -> zeros 8 + 3 = 11
    # rows 1-3: cols 0-3 hold 3 non-zeros, cols 4-7 hold 4 -> 6 groups break 2:4; 7 of 8 -> 3 break 4:8
    b = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 1], [0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bfloat16)
    # row 0: 3 then 1 non-zeros (breaks 2:4 once), 4 of 8 (4:8 holds); row 1: 2 and 2 -> zeros 8;
    # column 5 is zero in both rows
    c = torch.arange(12.0).reshape(2, 6)  # one zero (c[0, 0]); width 6: neither pattern applies
    norm = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0])  # 1-D: sparsity only
    return {"a.weight": a, "b.weight": b, "c.weight": c, "norm.weight": norm}


EXPECTED = {
    "a.weight": {"zeros": 11, "zero_rows": 1, "zero_cols": 1, "2:4": False, "4:8": False,
                 "violating_groups": {"2:4": 6, "4:8": 3}, "dtype": "F32", "bytes": 128, "shape": [4, 8]},
    "b.weight": {"zeros": 8, "zero_rows": 0, "zero_cols": 1, "2:4": False, "4:8": True,
                 "violating_groups": {"2:4": 1, "4:8": 0}, "dtype": "BF16", "bytes": 32, "shape": [2, 8]},
    "c.weight": {"zeros": 1, "zero_rows": 0, "zero_cols": 0, "2:4": None, "4:8": None,
                 "violating_groups": {"2:4": None, "4:8": None}, "dtype": "F32", "bytes": 48},
    "norm.weight": {"zeros": 2, "zero_rows": None, "zero_cols": None, "2:4": None, "4:8": None,
                    "violating_groups": {}, "bytes": 20},
}  # fmt: skip


def check_known(result: dict) -> None:
    for name, want in EXPECTED.items():
        got = result["per_tensor"][name]
        assert {k: got[k] for k in want} == want, name
    assert (result["tensors"], result["weights"], result["zeros"]) == (4, 32 + 16 + 12 + 5, 22)
    assert result["sparsity"] == pytest.approx(22 / 65)
    assert (result["matrices"], result["matrix_weights"], result["matrix_zeros"]) == (3, 60, 20)
    assert result["patterns"] == {"2:4": {"checked": 2, "valid_tensors": []},
                                  "4:8": {"checked": 2, "valid_tensors": ["b.weight"]}}  # fmt: skip
    assert (result["zero_rows"], result["zero_cols"]) == (1, 2)
    assert result["bytes"] == 128 + 32 + 48 + 20 and result["empty_tensors"] == []


def test_fold_counts_the_same_in_any_chunking():
    a = known_tensors()["a.weight"]
    for rows in (1, 2, 3, 4):
        t = fold_chunks(TensorStats("a", "f", "F32", [4, 8], 32, 128), a.split(rows))
        assert (t.zeros, t.zero_rows, t.zero_cols, t.violating) == (11, 1, 1, {"2:4": 6, "4:8": 3})
    # a 2:4 tensor is 4:8 too, whether the 4:8 groups are counted or inferred
    x = torch.tensor([[1.0, 0, 0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0, 0]])
    t = fold_chunks(TensorStats("x", "f", "F32", [2, 8], 16, 64), [x])
    assert t.violating == {"2:4": 0, "4:8": 0} and t.zero_cols == 3 and t.valid("4:8")  # cols 1, 2, 7


def test_known_zeros_in_one_file_and_in_an_indexed_sharded_folder(tmp_path, capsys):
    tensors = known_tensors()
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, single / "model.safetensors")
    check_known(inspect_checkpoint(str(single)))
    check_known(inspect_checkpoint(str(single / "model.safetensors")))

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i, chunk in enumerate((names[:2], names[2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, sharded / fname)
        weight_map.update(dict.fromkeys(chunk, fname))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    save_file({"stray": torch.zeros(3)}, sharded / "consolidated.safetensors")  # not in the index: ignored
    result = inspect_checkpoint(str(sharded))
    check_known(result)
    assert result["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

    assert cli.main(["inspect", str(sharded)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1] == "weights 65, zeros 22: overall sparsity 33.85% (2-D tensors: 33.33% of 60)"
    assert text[2] == "2:4 valid: none of 2 2-D tensors"
    assert text[3] == "4:8 valid: 1 of 2 2-D tensors: b.weight"
    assert text[4] == "all-zero rows: 1 in 1 tensors; all-zero columns: 2 in 2 tensors"
    row = next(line.split() for line in text if line.startswith("a.weight"))
    assert row == ["a.weight", "F32", "4x8", "128", "B", "34.38%", "no", "no", "1", "1"]
    assert cli.main(["inspect", str(sharded), "--json"]) == 0
    check_known(json.loads(capsys.readouterr().out))


@pytest.mark.slow
def test_a_2_4_output_of_prune(tmp_path):
    model, text = make_model_folder(tmp_path / "model"), make_text_file(tmp_path / "t.txt")
    out = tmp_path / "out"
    assert cli.main(["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "4", "--seq-len",
                     "16", "--pattern", "2:4", "--output-dir", str(out), "--no-progress"]) == 0  # fmt: skip
    report = json.loads((out / "pruning_report.json").read_text())
    result = inspect_checkpoint(str(out))
    targets = report["per_tensor"]
    assert len(targets) == 14
    for name, info in targets.items():
        got = result["per_tensor"][name]
        assert (got["zeros"], got["numel"], got["2:4"], got["4:8"]) == (
            info["zeros"],
            info["numel"],
            True,
            True,
        )
        assert got["sparsity"] == 0.5
    others = [n for n in result["per_tensor"] if n not in targets]
    assert result["patterns"]["2:4"]["valid_tensors"] == sorted(targets, key=list(result["per_tensor"]).index)
    assert result["per_tensor"]["model.embed_tokens.weight"]["2:4"] is False  # dense, not a target
    assert result["matrix_zeros"] == report["zero_weights"] + sum(result["per_tensor"][n]["zeros"] for n in others
                                                                   if len(result["per_tensor"][n]["shape"]) == 2)  # fmt: skip


def test_what_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "holes").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "holes" / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "holes" / "model.safetensors.index.json").write_text(json.dumps(index))
    cases = {
        str(tmp_path / "empty"): "holds no .safetensors file: it is not a safetensors checkpoint",
        str(tmp_path / "notes.txt"): "is not a .safetensors file or a checkpoint folder",
        str(tmp_path / "missing"): "does not exist: give a checkpoint folder, a .safetensors file or a Hub id",
        "not a repo id!": "does not exist: give a checkpoint folder, a .safetensors file or a Hub id",
        str(tmp_path / "bad"): "model.safetensors is not a readable safetensors file",
        str(tmp_path / "holes"): "model.safetensors.index.json names model-00002-of-00002.safetensors, which is missing",
    }  # fmt: skip
    for path, message in cases.items():
        assert cli.main(["inspect", path]) == 2, path
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (path, err)


def _run_inspect(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1", **env_extra)
    cmd = [sys.executable, "-m", "llm_gradprune", "inspect", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_hub_id_downloads_only_the_index_and_its_shards(tmp_path):
    tensors = known_tensors()
    files = {
        "model-00001-of-00002.safetensors": save({n: tensors[n] for n in ("a.weight", "b.weight")}),
        "model-00002-of-00002.safetensors": save({n: tensors[n] for n in ("c.weight", "norm.weight")}),
        "consolidated.safetensors": save(tensors),  # the same weights again, as some repos ship them
        "config.json": b"{}", "README.md": b"# a model\n", "pytorch_model.bin": b"\0" * 64,
    }  # fmt: skip
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors",
                  "c.weight": "model-00002-of-00002.safetensors", "norm.weight": "model-00002-of-00002.safetensors"}  # fmt: skip
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    with FakeHub() as hub:
        hub.seed("someone/known", files)
        proc = _run_inspect(
            {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home")}, "someone/known", "--json"
        )
        assert proc.returncode == 0, proc.stderr
        check_known(json.loads(proc.stdout))
        fetched = {r["path"].split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests
                   if "/resolve/" in r["path"] and r["method"] == "GET"}  # fmt: skip
        assert fetched == {"model.safetensors.index.json", *set(weight_map.values())}

        proc = _run_inspect({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home")}, "someone/absent")
        assert proc.returncode == 2
        assert "model 'someone/absent' is not on the Hub" in proc.stderr.strip()
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = _run_inspect({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_home")}, "someone/known")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "model 'someone/known' could not be reached" in line and "HF_HUB_OFFLINE is set" in line


MEASURE = """
import json, sys
from llm_gradprune.io.inspect import inspect_checkpoint

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

inspect_checkpoint(sys.argv[2])  # warm up imports and kernels on a tiny checkpoint
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
base = rss("VmRSS")
result = inspect_checkpoint(sys.argv[1])
sizes = [t["bytes"] for t in result["per_tensor"].values()]
print(json.dumps({"growth": rss("VmHWM") - base, "largest": max(sizes), "total": sum(sizes),
                  "files": len(result["files"]), "zeros": result["zeros"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_on_a_four_shard_checkpoint_stays_below_its_largest_tensor(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=4096, intermediate_size=4096, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=64,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)  # 8 fp32 tensors of 4096x4096 (64 MiB each), 512 MiB in all
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :100] = 0  # 100 all-zero columns to find
    model.save_pretrained(tmp_path / "big", max_shard_size="140MB")  # two big tensors a shard
    del model
    make_model_folder(tmp_path / "tiny")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), str(tmp_path / "tiny")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["files"] == 4 and m["largest"] == 4096 * 4096 * 4 and m["total"] > 8 * m["largest"]
    assert m["zeros"] >= 100 * 4096
    # one shard (2 tensors) or the whole model would be 128 or 512 MiB; reading a chunk at a time stays
    # below one tensor (measured 21-49 MiB for a largest tensor of 64 MiB)
    assert m["growth"] < m["largest"], m
