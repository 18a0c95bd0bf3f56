"""Pushing an output folder to the Hugging Face Hub: verify it, plan the upload, then create_repo and
upload_folder (which sends large files through the Hub's large-file protocol and skips files the repo
already holds unchanged).

Only a folder `prune` wrote and that still holds what its report says is pushed: pruning_report.json
and config.json present, every pruned tensor's zero count and every tensor's sha256, re-read from the
safetensors files, equal to the report's, no NaN/inf, and every file as `manifest.json` lists it. Only the
manifest's files (and the manifest) are sent: a file it does not list is refused unless `--allow-extra`
names it, a symlink is refused (never followed), a dotfile is never sent (io/manifest). The push takes
the folder, never the pruning job: a push that fails on the network leaves the folder as it was, and
running `push` again retries it.

The token is huggingface_hub's own (HF_TOKEN, else the cached `hf auth login`), read by it for each
request and sent only in the Authorization header; nothing here prints or writes it, and an error
message that would quote it has it masked. HF_ENDPOINT is read when the push runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
from pathlib import Path
from typing import Any

from ..errors import ConfigError, unreachable
from ..report import Report, as_report
from .checkpoint import VerificationError, verify_report
from .manifest import check_unchanged, plan_files

REPORT = "pruning_report.json"
BAD_REF = re.compile(r"(^[-/.])|(/$)|(\.lock$)|(\.\.)|(//)|([\s~^:?*\[\\@{])")


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo_id: str) -> str:
    """`owner/name` as the Hub accepts it (cheap: no network), else one line naming the value."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or "" in repo_id.split("/"):
        raise ConfigError(
            f"repo_id {repo_id!r} must be 'owner/name' (a user or organization, then the model's name)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"repo_id {repo_id!r} is not a valid Hub id: {first}") from None
    return repo_id


def check_revision(revision: str | None) -> str | None:
    """A branch name git accepts (None: the default branch)."""
    if revision is not None and (not revision or BAD_REF.search(revision)):
        raise ConfigError(f"revision {revision!r} is not a valid branch name")
    return revision


def check_pushable(folder: str | Path, allow_extra: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The folder's report, if the folder is an llm-gradprune output that still matches it; else one
    line saying why it is refused."""
    return _pushable(folder, allow_extra)[0]


def _pushable(folder: str | Path, allow_extra) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the report, what may be sent: io.manifest.plan_files) of a folder that passes every check."""
    path = Path(folder).expanduser()
    label = str(folder)
    if not path.is_dir():
        raise ConfigError(f"push folder {label!r} {'is not a folder' if path.exists() else 'does not exist'}")
    if not (path / REPORT).is_file():
        raise ConfigError(
            f"{label!r} is not an llm-gradprune output (no {REPORT}): push takes a folder `prune` wrote"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"{label!r} has no config.json: it is not a complete checkpoint; run prune again")
    sent = plan_files(path, label, allow_extra)  # symlinks and unknown files: before any file is read
    try:
        json.loads((path / "config.json").read_text())
        report = json.loads((path / REPORT).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{label!r}: a JSON file does not parse ({err})") from None
    if check_verifiable(report, label).verified is not True:
        raise ConfigError(f"{label!r}: {REPORT} does not say the checkpoint was verified when saved")
    try:
        verify_report(path, report)
    except (VerificationError, ValueError, struct.error, OSError) as err:
        raise ConfigError(
            f"{label!r} fails verification, refusing to push it: {err} (were the weights changed after "
            "pruning? run prune again)"
        ) from None
    if sent["manifest"] is not None:
        check_unchanged(path, label, sent["manifest"])
    return report, sent


def check_verifiable(report: Any, label: str) -> Report:
    """The report, if it holds what verification re-reads: tensor shapes (structured) or zero counts (sparse)."""
    try:
        r = Report.from_dict(report)
    except (AttributeError, TypeError) as err:  # not an object of sections: JSON of another shape
        raise ConfigError(f"{label!r}: {REPORT} is not a report llm-gradprune reads ({err})") from None
    if r.structured:
        if not isinstance(r.shrinking.tensor_shapes, dict) or not r.shrinking.tensor_shapes:
            raise ConfigError(f"{label!r}: {REPORT} holds no tensor shapes: it cannot be verified")
    elif not r.sparsity.per_tensor or not all(
        isinstance(t.zeros, int) for t in r.sparsity.per_tensor.values()
    ):
        raise ConfigError(f"{label!r}: {REPORT} holds no per-tensor zero counts: it cannot be verified")
    return r


def upload_files(folder: str | Path, names: list[str]) -> list[dict[str, Any]]:
    """The files a push sends, as relative paths with their sizes."""
    root = Path(folder).expanduser()
    return [{"path": rel, "bytes": (root / rel).stat().st_size} for rel in names]


def exact_patterns(names: list[str]) -> list[str]:
    """upload_folder's allow_patterns matching exactly `names` (fnmatch: `[`, `*`, `?` escaped)."""
    return ["".join(f"[{c}]" if c in "[]*?" else c for c in name) for name in names]


def default_commit_message(report: Report | dict[str, Any]) -> str:
    r = as_report(report)
    if r.structured:
        shrunk = r.shrinking
        return (f"Upload structured-pruned checkpoint ({shrunk.structure}, {shrunk.importance.name}, "
                f"{100 * float(shrunk.decoder_kept):.1f}% of the decoder kept) with llm-gradprune")  # fmt: skip
    sp = r.sparsity
    how = f"pattern {sp.pattern}" if sp.pattern else f"{100 * float(sp.overall_sparsity):.1f}% sparsity"
    return f"Upload pruned checkpoint ({sp.criterion or '?'}, {how}) with llm-gradprune"


def _masked(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    text = " ".join(str(text).split())
    return text.replace(token, "***") if token else text


def retry_command(folder: str | Path, repo_id: str, private: bool, revision: str | None) -> str:
    """The `push` command that retries this push (it skips what the repo already holds)."""
    words = ["llm-gradprune", "push", str(folder), "--repo-id", repo_id]
    words += (["--private"] if private else []) + (["--revision", revision] if revision else [])
    return shlex.join(words)


def _failure(err: BaseException, step: str, repo_id: str, retry_with: str) -> ConfigError | None:
    """One line for a failure talking to the Hub (None: not a Hub or network failure, a real bug)."""
    from huggingface_hub.errors import HfHubHTTPError

    where = f"push to {repo_id!r} at {endpoint()} failed while {step}"
    retry = f"the folder is unchanged: retry with {retry_with}"
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        said = _masked(err.server_message or "")
        hint = {401: "the token was refused: set HF_TOKEN or run `hf auth login`",
                403: "the token may not write to this namespace"}.get(status, "")  # fmt: skip
        detail = "; ".join(x for x in (said, hint) if x)
        return ConfigError(f"{where}: HTTP {status}{f' ({detail})' if detail else ''}; {retry}")
    if unreachable(err) or type(err).__module__.split(".")[0].startswith(("httpx", "requests", "urllib3")):
        cause = _masked(str(err) or type(err).__name__)
        return ConfigError(f"{where}: {cause} (network); {retry}")
    return None


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    allow_extra: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Verify `folder`, then push it to `repo_id` (creating the repo, and the branch `revision`, if
    missing). Returns what was pushed, or with `dry_run` the plan, uploading nothing: repo_id, endpoint,
    url, revision, private, files (relative path and bytes), skipped (dot entries, never sent),
    total_bytes, commit_message, and after a push commit_url and commit_oid. `allow_extra`: files the
    manifest does not list that are sent too. Every failure is a ConfigError of one line."""
    check_repo_id(repo_id)
    check_revision(revision)
    report, sent = _pushable(folder, allow_extra)
    files = upload_files(folder, sent["files"])
    branch = revision or "main"
    url = f"{endpoint()}/{repo_id}" + (f"/tree/{branch}" if revision else "")
    plan = {
        "repo_id": repo_id,
        "endpoint": endpoint(),
        "url": url,
        "revision": branch,
        "private": bool(private),
        "files": files,
        "skipped": sent["skipped"],
        "total_bytes": sum(f["bytes"] for f in files),
        "commit_message": commit_message or default_commit_message(report),
        "dry_run": bool(dry_run),
    }
    if dry_run:
        return plan
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise ConfigError(
            f"push to {repo_id!r} needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"
        )
    api = HfApi(endpoint=endpoint())
    step = "creating the repo"
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private:
            step = "checking the repo's visibility"
            if not api.repo_info(repo_id).private:
                raise ConfigError(
                    f"repo {repo_id!r} already exists and is public: --private does not change an existing "
                    "repo; make it private on the Hub first, or push without --private"
                )
        if revision and revision != "main":
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = f"uploading {len(files)} files"
        info = api.upload_folder(
            folder_path=str(Path(folder).expanduser()),
            repo_id=repo_id,
            revision=revision,
            commit_message=plan["commit_message"],
            allow_patterns=exact_patterns([f["path"] for f in files]),
        )
    except ConfigError:
        raise
    except ValueError as err:  # e.g. the card's metadata refused by the Hub's validation
        raise ConfigError(f"push to {repo_id!r} refused while {step}: {_masked(err)}") from None
    except Exception as err:  # noqa: BLE001 - sorted by _failure: the Hub's answer, the network, or a bug
        failure = _failure(err, step, repo_id, retry_command(folder, repo_id, private, revision))
        if failure is None:
            raise
        raise failure from None
    return {**plan, "commit_url": info.commit_url, "commit_oid": info.oid}
