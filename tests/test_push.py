"""`push`: the real huggingface_hub client (2.4) against a local fake Hub (tests/hub_server.py).

How the client is pointed at the fake Hub: the CLI tests run `python -m llm_gradprune push` in a
subprocess whose environment sets HF_ENDPOINT, HF_TOKEN (a fake secret) and HF_HOME, exactly as a
user's shell would; huggingface_hub reads them when it is imported there, so nothing is patched. The
one in-process test of `push_folder` (the library call `prune --push-to-hub` makes) sets HF_ENDPOINT
with monkeypatch, which llm_gradprune.io.hub reads when it pushes, and patches
huggingface_hub.constants.ENDPOINT for the client's own import-time copy.

No part of the protocol is patched: the fake Hub answers "regular" upload mode for every file, so the
bytes travel base64-encoded inside the commit and neither LFS nor xet storage is involved (with hf_xet
installed, upload_folder takes its pipelined path, which opens no xet upload for regular files).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llm_gradprune import commands as cli

from .hub_server import FakeHub
from .tiny_folder import ROOT, make_model_folder, make_text_file

SECRET = "hf_FAKEsecretTOKEN0123456789abcdef"
REPO = "someone/tiny-pruned"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    model, text = make_model_folder(root / "model"), make_text_file(root / "t.txt")
    out = root / "out"
    assert cli.main(["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "4",
                     "--seq-len", "16", "--sparsity", "0.5", "--output-dir", str(out), "--no-progress"]) == 0  # fmt: skip
    return out


def folder_files(folder: Path) -> dict[str, bytes]:
    """What a push of a folder prune wrote sends: every file but the dotfiles (the local record)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(".")
    }


def run_push(
    home: Path, endpoint: str, *args: str, token: str | None = SECRET
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE")}  # fmt: skip
    env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, "-m", "llm_gradprune", "push", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def assert_token_only_in_authorization(hub: FakeHub, *texts: str, roots: tuple[Path, ...] = ()) -> None:
    """The secret travels in the Authorization header of the Hub calls and nowhere else: no other
    header, no request body, no printed line, no file written under `roots`."""
    api = [r for r in hub.requests if "agent-harnesses" not in r["path"]]  # the client's telemetry probe
    assert api
    for r in api:
        auth = {k.lower(): v for k, v in r["headers"].items()}.get("authorization")
        assert auth == f"Bearer {SECRET}", (r["method"], r["path"])
        others = [v for k, v in r["headers"].items() if k.lower() != "authorization"]
        assert not any(SECRET in v for v in others) and SECRET.encode() not in r["body"]
    assert not any(SECRET in t for t in texts)
    for root in roots:
        for p in root.rglob("*"):
            assert not p.is_file() or SECRET.encode() not in p.read_bytes(), p


def commit_payload(request: dict) -> tuple[dict, dict[str, bytes]]:
    """(the commit's header, the files it adds) decoded from its ndjson body."""
    items = [json.loads(line) for line in request["body"].splitlines()]
    header = next(i["value"] for i in items if i["key"] == "header")
    added = {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in items if i["key"] == "file"}
    assert {i["key"] for i in items} <= {"header", "file"}
    return header, added


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- no network


def test_dry_run_lists_exactly_the_files_and_the_target_and_uploads_nothing(pruned, capsys, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        args = ["push", str(pruned), "--repo-id", REPO, "--push-private", "--push-revision", "exp", "--dry-run"]  # fmt: skip
        assert cli.main(args) == 0
        text = capsys.readouterr().out
        assert cli.main([*args, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
    assert hub.requests == []
    files = folder_files(pruned)
    assert [f["path"] for f in plan["files"]] == list(files)
    assert {f["path"]: f["bytes"] for f in plan["files"]} == {k: len(v) for k, v in files.items()}
    assert plan["total_bytes"] == sum(map(len, files.values()))
    assert (plan["repo_id"], plan["revision"], plan["private"], plan["endpoint"]) == (
        REPO,
        "exp",
        True,
        hub.url,
    )
    assert plan["dry_run"] and "commit_url" not in plan
    lines = text.splitlines()
    assert lines[0].startswith(f"dry run: would push {len(files)} files")
    assert f"to {REPO} (revision exp, private) at {hub.url}" in lines[0]
    listed = {ln.split()[0]: int(ln.split()[1].replace(",", "")) for ln in lines[2:-2]}
    assert listed == {k: len(v) for k, v in files.items()}
    assert lines[-2:] == ["never sent (dotfiles): .llm-gradprune-local.json", "nothing was uploaded"]
    assert plan["skipped"] == [".llm-gradprune-local.json"]
    assert {"README.md", "config.json", "model.safetensors", "pruning_report.json", "manifest.json"} <= set(
        listed
    )


def test_a_folder_whose_weights_changed_after_pruning_is_refused(pruned, tmp_path, capsys, monkeypatch):
    altered = tmp_path / "altered"
    shutil.copytree(pruned, altered)
    weights = load_file(altered / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    zeros = int((weights[name] == 0).sum())
    weights[name][weights[name] == 0] = 0.5  # fine-tuned after pruning: the zeros are gone
    save_file(weights, altered / "model.safetensors", metadata={"format": "pt"})
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", SECRET)
        for extra in ([], ["--dry-run"]):
            assert cli.main(["push", str(altered), "--repo-id", REPO, *extra]) == 2
            line = one_line(capsys.readouterr().err)
            assert "fails verification, refusing to push it" in line
            assert f"{name}: 0 zeros written but the report says {zeros}" in line
    assert hub.requests == []


@pytest.mark.parametrize(
    ("case", "repo_id", "message"),
    [
        ("plain model", REPO, "is not an llm-gradprune output (no pruning_report.json)"),
        ("no config", REPO, "has no config.json"),
        ("missing", REPO, "does not exist"),
        ("ok", "no-namespace", "repo_id 'no-namespace' must be 'owner/name'"),
        ("ok", "a/b/c", "repo_id 'a/b/c' must be 'owner/name'"),
        ("ok", "me/bad--name", "repo_id 'me/bad--name' is not a valid Hub id"),
    ],
)  # fmt: skip
def test_bad_folders_and_repo_ids_are_one_line(pruned, tmp_path, capsys, case, repo_id, message):
    folder = {"plain model": lambda: make_model_folder(tmp_path / "m"), "missing": lambda: tmp_path / "nope",
              "ok": lambda: pruned, "no config": lambda: _without_config(pruned, tmp_path)}[case]()  # fmt: skip
    assert cli.main(["push", str(folder), "--repo-id", repo_id, "--dry-run"]) == 2
    assert message in one_line(capsys.readouterr().err)


def _without_config(pruned: Path, tmp_path: Path) -> Path:
    shutil.copytree(pruned, tmp_path / "partial")
    (tmp_path / "partial" / "config.json").unlink()
    return tmp_path / "partial"


def test_check_repo_id_and_revision():
    from llm_gradprune.errors import ConfigError
    from llm_gradprune.io.hub import check_repo_id, check_revision

    assert check_repo_id("org-1/model_v2.5") == "org-1/model_v2.5"
    assert check_revision("exp/2-4") == "exp/2-4" and check_revision(None) is None
    for bad in ("x", "/x", "x/", "a/b c", ""):
        with pytest.raises(ConfigError):
            check_repo_id(bad)
    for bad in ("", "a b", "-x", "a..b", "a:b", "x.lock"):
        with pytest.raises(ConfigError, match="is not a valid branch name"):
            check_revision(bad)


# ---------------------------------------------------------------- the real client, in process


def test_push_folder_returns_what_was_pushed(pruned, monkeypatch):
    from huggingface_hub import constants

    from llm_gradprune.io.hub import push_folder

    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", SECRET)
        result = push_folder(pruned, REPO, commit_message="first")
    files = folder_files(pruned)
    assert hub.files(REPO) == {".gitattributes": hub.files(REPO)[".gitattributes"], **files}
    assert result["commit_oid"] == hub.repos[REPO]["branches"]["main"]
    assert result["commit_url"] == f"{hub.url}/{REPO}/commit/{result['commit_oid']}"
    assert (result["repo_id"], result["revision"], result["private"], result["dry_run"]) == (
        REPO,
        "main",
        False,
        False,
    )
    assert [f["path"] for f in result["files"]] == list(files)
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    assert "visibility" not in json.loads(create["body"])  # not --push-private: the owner's default applies
    assert_token_only_in_authorization(hub, json.dumps(result))


# ---------------------------------------------------------------- the CLI, in a subprocess


@pytest.mark.slow
def test_push_sends_the_folder_to_the_branch_privately_and_the_token_only_in_the_header(pruned, tmp_path):
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        proc = run_push(home, hub.url, str(pruned), "--repo-id", REPO, "--push-private", "--push-revision", "exp/2-4",
                        "--commit-message", "2:4 test push")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = folder_files(pruned)
    create = json.loads(next(r for r in hub.requests if r["path"] == "/api/repos/create")["body"])
    assert (create["organization"], create["name"], create["visibility"]) == (
        "someone",
        "tiny-pruned",
        "private",
    )
    assert hub.repos[REPO]["private"]
    assert any(
        r["method"] == "POST" and r["path"] == f"/api/models/{REPO}/branch/exp%2F2-4" for r in hub.requests
    )
    (commit,) = hub.commit_requests()
    assert commit["path"] == f"/api/models/{REPO}/commit/exp%2F2-4"
    header, added = commit_payload(commit)
    assert header["summary"] == "2:4 test push"
    assert added == files  # every file, byte for byte, and nothing else
    assert set(hub.files(REPO, "main")) == {".gitattributes"}  # main untouched
    assert {k: v for k, v in hub.files(REPO, "exp/2-4").items() if k != ".gitattributes"} == files
    assert f"pushed {len(files)} files" in proc.stdout and f"{hub.url}/{REPO}/tree/exp/2-4" in proc.stdout
    assert_token_only_in_authorization(hub, proc.stdout, proc.stderr, roots=(home, pruned))


@pytest.mark.slow
def test_network_failures_are_one_line_and_running_push_again_retries(pruned, tmp_path):
    home = tmp_path / "hf_home"
    closed = f"http://127.0.0.1:{free_port()}"
    proc = run_push(home, closed, str(pruned), "--repo-id", REPO)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"push to {REPO!r} at {closed} failed while creating the repo" in line
    assert line.endswith(
        f"(network); the folder is unchanged: retry with llm-gradprune push {pruned} --repo-id {REPO}"
    )
    with FakeHub() as hub:
        hub.fail_status = 500
        proc = run_push(home, hub.url, str(pruned), "--repo-id", REPO)
        assert proc.returncode == 2
        assert f"push to {REPO!r} at {hub.url} failed while creating the repo: HTTP 500" in one_line(
            proc.stderr
        )
        assert hub.repos == {}
        hub.fail_status = None  # the Hub is back: the same command now succeeds, with no pruning redone
        proc = run_push(home, hub.url, str(pruned), "--repo-id", REPO)
        assert proc.returncode == 0, proc.stderr
        assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == folder_files(pruned)
        commits = len(hub.commit_requests())
        proc = run_push(home, hub.url, str(pruned), "--repo-id", REPO)  # again: nothing changed, no commit
        assert proc.returncode == 0, proc.stderr
        assert len(hub.commit_requests()) == commits == 1
        preupload = [r for r in hub.requests if "/preupload/" in r["path"]][-1]
        assert len(json.loads(preupload["body"])["files"]) == len(folder_files(pruned))
    assert_token_only_in_authorization(hub, proc.stdout, proc.stderr, roots=(home, pruned))


@pytest.mark.slow
def test_cached_login_is_used_a_missing_token_is_refused_and_private_never_publishes(pruned, tmp_path):
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        proc = run_push(home, hub.url, str(pruned), "--repo-id", REPO, token=None)
        assert proc.returncode == 2 and "needs a Hugging Face token" in one_line(proc.stderr)
        assert [r for r in hub.requests if "agent-harnesses" not in r["path"]] == []
        home.mkdir(exist_ok=True)
        (home / "token").write_text(SECRET)  # what `hf auth login` caches
        proc = run_push(home, hub.url, str(pruned), "--repo-id", REPO, token=None)
        assert proc.returncode == 0, proc.stderr
        assert not hub.repos[REPO]["private"]
        (home / "token").unlink()  # the check below must not find the file we wrote ourselves
        proc = run_push(home, hub.url, str(pruned), "--repo-id", REPO, "--push-private", "--push-revision", "p")  # fmt: skip
        assert proc.returncode == 2
        assert f"repo {REPO!r} already exists and is public" in one_line(proc.stderr)
        assert len(hub.commit_requests()) == 1 and "p" not in hub.repos[REPO]["branches"]
    assert_token_only_in_authorization(hub, proc.stdout, proc.stderr, roots=(home, pruned))


def test_prune_with_push_to_hub_pushes_the_verified_checkpoint(tmp_path):
    """`prune --push-to-hub`: the same push after the checkpoint is in place; the card loads the repo."""
    model, text = make_model_folder(tmp_path / "model"), make_text_file(tmp_path / "t.txt")
    out = tmp_path / "out"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")
    }
    with FakeHub() as hub:
        env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_TOKEN=SECRET,
                   HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
        cmd = [sys.executable, "-m", "llm_gradprune", "prune", "--model", str(model), "--dataset", str(text),
               "--num-samples", "4", "--seq-len", "16", "--output-dir", str(out), "--no-progress",
               "--push-to-hub", REPO, "--push-private"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        commits = [r for r in hub.requests if r["method"] == "POST" and "/commit/" in r["path"]]
    assert len(commits) == 1 and REPO in commits[0]["path"]
    _, added = commit_payload(commits[0])
    assert added == folder_files(out)
    assert f'from_pretrained("{REPO}")' in (out / "README.md").read_text()
    assert "pushed: " in proc.stdout and SECRET not in proc.stdout + proc.stderr


def test_a_bad_push_target_is_refused_before_any_work(tmp_path, capsys):
    model, text = make_model_folder(tmp_path / "model"), make_text_file(tmp_path / "t.txt")
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--output-dir", str(tmp_path / "o"),
            "--push-to-hub", "not a repo", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a repo" in err and not (tmp_path / "o").exists()
