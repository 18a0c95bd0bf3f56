"""Issue 23, "Leaks" and non-finite checkpoints: push sends only what the tool wrote (manifest.json,
never a dotfile, never through a symlink), refuses edited weights (each tensor's sha256 in the report),
inspect never reads a shard outside the checkpoint folder, no local path is written into a file a push
sends, and a checkpoint holding NaN/inf is never saved.

Every refusal: exit 2, one line naming the bad value, nothing uploaded (the fake Hub saw no request) and
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_gradprune import commands as cli

from .hub_server import FakeHub
from .tiny_folder import make_model_folder, make_text_file

REPO = "someone/tiny-pruned"
NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("leaks")
    model, text = make_model_folder(root / "model"), make_text_file(root / "t.txt")
    out = root / "out"
    assert cli.main(["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "4",
                     "--seq-len", "16", "--sparsity", "0.5", "--output-dir", str(out), "--no-progress"]) == 0  # fmt: skip
    return {"root": root, "model": model, "text": text, "out": out}


def copy_of(assets, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(assets["out"], folder)
    return folder


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def push_refused(folder: Path, capsys, monkeypatch, *extra: str) -> str:
    """Push `folder` for real (a token is set): refused in one line before any request."""
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_FAKEsecret")
        capsys.readouterr()
        assert cli.main(["push", str(folder), "--repo-id", REPO, *extra]) == 2
        line = one_line(capsys)
    assert hub.requests == []
    return line


def dry_run(folder: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert cli.main(["push", str(folder), "--repo-id", REPO, "--dry-run", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- push sends only what the tool wrote


def test_the_manifest_lists_every_file_the_save_wrote(assets):
    out = assets["out"]
    files = json.loads((out / "manifest.json").read_text())["files"]
    written = {p.name for p in out.iterdir() if not p.name.startswith(".")} - {"manifest.json"}
    assert set(files) == written
    assert files["model.safetensors"]["bytes"] == (out / "model.safetensors").stat().st_size


def test_a_dotfile_is_never_sent_and_a_symlink_out_is_refused(assets, tmp_path, capsys, monkeypatch):
    folder = copy_of(assets, tmp_path)
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    plan = dry_run(folder, capsys)
    sent = [f["path"] for f in plan["files"]]
    assert ".env" not in sent and ".env" in plan["skipped"] and "manifest.json" in sent
    secret = tmp_path / "system-file"
    secret.write_text("root:x:0:0\n")
    (folder / "passwd").symlink_to(secret)
    line = push_refused(folder, capsys, monkeypatch)
    assert "passwd is a symlink or not a regular file: push never follows links" in line
    (folder / "passwd").unlink()
    (folder / "weights").symlink_to(tmp_path, target_is_directory=True)  # a folder link: not walked either
    assert "weights is a symlink" in push_refused(folder, capsys, monkeypatch)


def test_an_unknown_file_is_refused_unless_allow_extra_names_it(assets, tmp_path, capsys, monkeypatch):
    folder = copy_of(assets, tmp_path)
    (folder / "notes.txt").write_text("my notes\n")
    line = push_refused(folder, capsys, monkeypatch)
    assert "notes.txt was not written by llm-gradprune (not in manifest.json)" in line
    assert "--allow-extra notes.txt" in line
    plan = dry_run(folder, capsys, "--allow-extra", "notes.txt")
    assert "notes.txt" in [f["path"] for f in plan["files"]]
    for bad, says in ((".env", "not a dotfile"), ("../t.txt", "not a dotfile or path out"),
                      ("absent.txt", "is not a regular file in")):  # fmt: skip
        (folder / ".env").write_text("x")
        assert says in push_refused(folder, capsys, monkeypatch, "--allow-extra", bad)


def test_a_file_changed_after_saving_is_refused(assets, tmp_path, capsys, monkeypatch):
    folder = copy_of(assets, tmp_path)
    with open(folder / "README.md", "a") as fh:
        fh.write("\nHF_TOKEN=hf_secret\n")
    line = push_refused(folder, capsys, monkeypatch)
    assert "README.md changed since it was saved (its size or sha256 differs from manifest.json)" in line
    (folder / "README.md").unlink()
    assert "README.md, listed in manifest.json, is missing" in push_refused(folder, capsys, monkeypatch)


def test_a_folder_saved_before_manifests_sends_only_the_files_named(assets, tmp_path, capsys, monkeypatch):
    folder = copy_of(assets, tmp_path)
    (folder / "manifest.json").unlink()
    line = push_refused(folder, capsys, monkeypatch)
    assert "has no manifest.json (saved before llm-gradprune wrote one): run prune again" in line
    named = ["config.json", "model.safetensors", "README.md"]
    plan = dry_run(folder, capsys, "--allow-extra", *named)
    assert [f["path"] for f in plan["files"]] == sorted(named)


def test_a_push_sends_exactly_the_manifest_files(assets, tmp_path, monkeypatch):
    """The real client against the fake Hub: upload_folder's allow-list holds the plan, no more."""
    from huggingface_hub import constants

    from llm_gradprune.io.hub import push_folder

    folder = copy_of(assets, tmp_path)
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("x")
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_FAKEsecret")
        result = push_folder(folder, REPO)
        sent = set(hub.files(REPO)) - {".gitattributes"}
    listed = set(json.loads((folder / "manifest.json").read_text())["files"])
    assert sent == listed | {"manifest.json"} == {f["path"] for f in result["files"]}


# ---------------------------------------------------------------- edited weights


def test_weights_edited_with_the_zeros_kept_are_refused(assets, tmp_path, capsys, monkeypatch):
    from llm_gradprune.io.checkpoint import VerificationError, read_report, verify_report

    folder = copy_of(assets, tmp_path)
    report = read_report(folder)
    assert set(report["tensor_sha256"]) == set(load_file(folder / "model.safetensors"))
    weights = load_file(folder / "model.safetensors")
    weights[NAME][weights[NAME] != 0] *= 1.01  # fine-tuned: every zero kept, the kept weights changed
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    line = push_refused(folder, capsys, monkeypatch)
    assert f"fails verification, refusing to push it: {NAME} was changed after saving" in line
    with pytest.raises(VerificationError, match=f"{NAME} was changed after saving"):
        verify_report(folder, report)


# ---------------------------------------------------------------- inspect stays in the folder


def _indexed(tmp_path: Path, shard: str) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = {"metadata": {}, "weight_map": {"w": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "ABS", "link.safetensors"])
def test_inspect_refuses_an_index_naming_a_file_outside_the_folder(tmp_path, capsys, shard):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.ones(2, 4)}, other / "model.safetensors")
    name = str(other / "model.safetensors") if shard == "ABS" else shard
    folder = _indexed(tmp_path, name)
    if shard == "link.safetensors":
        (folder / shard).symlink_to(other / "model.safetensors")
    capsys.readouterr()
    assert cli.main(["inspect", str(folder)]) == 2
    assert f"names {name!r}, which lies outside the checkpoint folder: refusing to read it" in one_line(
        capsys
    )


def test_inspect_refuses_a_shard_linked_out_of_a_folder_without_index(tmp_path, capsys):
    save_file({"w": torch.ones(2, 4)}, tmp_path / "secret.safetensors")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tmp_path / "secret.safetensors")
    capsys.readouterr()
    assert cli.main(["inspect", str(folder)]) == 2
    assert "model.safetensors is a symlink out of the checkpoint folder" in one_line(capsys)


# ---------------------------------------------------------------- no local path in what is pushed


def test_no_local_path_is_written_into_a_pushed_file(assets, capsys):
    import yaml

    from llm_gradprune.io.checkpoint import read_report

    out, root = assets["out"], str(assets["root"])
    plan = dry_run(out, capsys)
    for f in plan["files"]:
        assert root.encode() not in (out / f["path"]).read_bytes(), f["path"]
    settings = yaml.safe_load((out / "prune_config.yaml").read_text())
    assert (settings["model"], settings["dataset"], settings["output_dir"]) == ("model", "t.txt", "out")
    shown = json.loads((out / "pruning_report.json").read_text())
    assert shown["model"] == "model" and shown["dataset"]["name"] == "t.txt"
    # this machine keeps the paths beside it (a dotfile push never sends): recover finds the base model
    assert read_report(out)["model"] == str(assets["model"])


# ---------------------------------------------------------------- never a non-finite checkpoint


def test_a_model_with_nan_weights_is_never_saved(assets, tmp_path, capsys, monkeypatch):
    """The verification re-reads every tensor: NaN/inf anywhere is one line naming the tensor, exit 2,
    and no output folder (nor a partial one) is left."""
    from llm_gradprune.job import skeleton

    real = skeleton.save_pruned

    def diverged(model, *args, **kw):
        with torch.no_grad():
            model.get_parameter(NAME)[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
        return real(model, *args, **kw)

    monkeypatch.setattr(skeleton, "save_pruned", diverged)
    out = tmp_path / "out"
    capsys.readouterr()
    argv = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--num-samples", "4",
            "--seq-len", "16", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    line = one_line(capsys)
    assert f"checkpoint not saved: {NAME} holds 3 NaN/inf values of" in line
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_a_pushed_folder_with_nan_weights_is_refused(assets, tmp_path, capsys, monkeypatch):
    from llm_gradprune.io.checkpoint import NonFiniteError, read_report, scan_files, verify_report

    folder = copy_of(assets, tmp_path)
    weights = load_file(folder / "model.safetensors")
    row, col = (weights[NAME] != 0).nonzero()[0].tolist()
    weights[NAME][row, col] = float("nan")  # a kept weight turned NaN: the zero count still matches
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert scan_files(folder).nonfinite[:2] == (NAME, 1)
    line = push_refused(folder, capsys, monkeypatch)
    assert f"fails verification, refusing to push it: {NAME} holds 1 NaN/inf values" in line
    with pytest.raises(NonFiniteError, match=NAME):
        verify_report(folder, read_report(folder))


def test_prune_refuses_a_model_whose_index_leaves_its_folder(tmp_path, capsys):
    """Every loader of ours, not only inspect: a model folder whose index names a shard outside it."""
    model = make_model_folder(tmp_path / "m")
    (tmp_path / "other").mkdir()
    shutil.move(model / "model.safetensors", tmp_path / "other" / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../other/model.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    text = make_text_file(tmp_path / "t.txt")
    capsys.readouterr()  # the folder's own save printed a progress bar
    code = cli.main(["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "4", "--seq-len", "16",
                     "--output-dir", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "names '../other/model.safetensors', which lies outside the checkpoint folder" in err
    assert not (tmp_path / "out").exists()
