"""`llm-gradprune push OUTPUT_DIR --repo-id owner/name`: verify a pruned checkpoint and push it to the Hub
(HF_TOKEN or the cached login, HF_ENDPOINT honoured); a failed push is retried by running it again.
Only the files the folder's manifest.json lists are sent, plus those `--allow-extra` names."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .inspect import human_bytes

HELP = "verify a pruned output folder and push it to the Hugging Face Hub"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("push", help=HELP, description=HELP)
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a folder `llm-gradprune prune` wrote")
    p.add_argument(
        "--repo-id", required=True, help="the Hub repo to push to: owner/name (created if missing)"
    )
    # the spellings of prune's push_private / push_revision settings: one name for one thing
    p.add_argument("--push-private", dest="private", action="store_true",
                   help="create the repo private (an existing public one is refused)")  # fmt: skip
    p.add_argument("--push-revision", dest="revision", default=None,
                   help="branch to push to, created if missing (default: main)")  # fmt: skip
    p.add_argument("--commit-message", default=None, help="commit title (default: names the method)")
    p.add_argument("--allow-extra", nargs="+", action="extend", default=[], metavar="FILE",
                   help="also send these files of the folder, which manifest.json does not list (never a "
                   "dotfile or a symlink); for a folder saved without a manifest: every file to send")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="verify and list the files and target; upload nothing")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result (or the plan) as one JSON object")
    return p


def format_text(result: dict[str, Any]) -> str:
    visibility = (
        "private" if result["private"] else "visibility: the repo's own, or the owner's default if new"
    )
    target = (f"{result['repo_id']} (revision {result['revision']}, {visibility}) at {result['endpoint']}")  # fmt: skip
    count = f"{len(result['files'])} files, {human_bytes(result['total_bytes'])}"
    if result["dry_run"]:
        width = max(len(f["path"]) for f in result["files"])
        lines = [f"dry run: would push {count} to {target}", f"commit message: {result['commit_message']}"]
        lines += [f"  {f['path'].ljust(width)}  {f['bytes']:>14,} B" for f in result["files"]]
        if result.get("skipped"):
            lines.append(f"never sent (dotfiles): {', '.join(result['skipped'])}")
        lines.append("nothing was uploaded")
        return "\n".join(lines)
    return f"pushed {count} to {target}: {result['url']}\ncommit: {result['commit_url']}"


def run(args: argparse.Namespace) -> int:
    from ..io.hub import push_folder

    result = push_folder(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, dry_run=args.dry_run,
                         allow_extra=args.allow_extra)  # fmt: skip
    print(json.dumps(result) if args.json else format_text(result))
    return 0
