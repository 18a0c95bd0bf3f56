"""`llm-gradprune inspect PATH_OR_REPO_ID`: sparsity, 2:4 / 4:8 validity and all-zero rows/columns of
any safetensors checkpoint, one tensor chunk in memory at a time."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

HELP = "sparsity, 2:4 / 4:8 validity and all-zero rows/columns of any safetensors checkpoint"
NAMES_SHOWN = 4


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help=HELP, description=HELP)
    p.add_argument("checkpoint", metavar="PATH_OR_REPO_ID",
                   help="checkpoint folder, one .safetensors file, or a Hub id (downloads the shards only)")  # fmt: skip
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id (default: main)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _which(valid: list[str], checked: list[str]) -> str:
    """'all 14', 'none of 14', or the count with the few valid (or the few invalid) tensors named."""
    invalid = [n for n in checked if n not in set(valid)]
    of = f"of {len(checked)} 2-D tensors"
    if not checked:
        return "no 2-D tensor has a width it divides"
    if not invalid:
        return f"all {len(checked)} 2-D tensors"
    if not valid:
        return f"none {of}"
    if len(valid) <= NAMES_SHOWN:
        return f"{len(valid)} {of}: {', '.join(valid)}"
    if len(invalid) <= NAMES_SHOWN:
        return f"{len(valid)} {of}, all but {', '.join(invalid)}"
    return f"{len(valid)} {of}"


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def format_text(result: dict[str, Any]) -> str:
    """A summary, then one table row per tensor."""
    lines = [
        f"checkpoint {result['source']}: {len(result['files'])} file(s), {result['tensors']:,} tensors, "
        f"{human_bytes(result['bytes'])}",
        f"weights {result['weights']:,}, zeros {result['zeros']:,}: overall sparsity "
        f"{_percent(result['sparsity'])} (2-D tensors: {_percent(result['matrix_sparsity'])} of "
        f"{result['matrix_weights']:,})",
    ]
    for p, info in result["patterns"].items():
        checked = [n for n, t in result["per_tensor"].items() if t[p] is not None]
        lines.append(f"{p} valid: {_which(info['valid_tensors'], checked)}")
    lines.append(
        f"all-zero rows: {result['zero_rows']:,} in {result['tensors_with_zero_rows']} tensors; "
        f"all-zero columns: {result['zero_cols']:,} in {result['tensors_with_zero_cols']} tensors"
    )
    if result["empty_tensors"]:
        lines.append(f"tensors with every weight zero: {', '.join(result['empty_tensors'])}")
    if result["unreadable_tensors"]:
        lines.append(f"not counted (dtype torch cannot read): {', '.join(result['unreadable_tensors'])}")
    pattern_names = list(result["patterns"])
    head = ["tensor", "dtype", "shape", "size", "sparsity", *pattern_names, "zero rows", "zero cols"]
    rows = [
        [name, t["dtype"], "x".join(map(str, t["shape"])) or "scalar", human_bytes(t["bytes"]),
         _percent(t["sparsity"]), *(_yes(t[p]) for p in pattern_names),
         "-" if t["zero_rows"] is None else f"{t['zero_rows']:,}",
         "-" if t["zero_cols"] is None else f"{t['zero_cols']:,}"]
        for name, t in result["per_tensor"].items()
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = {0, 1, 2}
    lines.append("")
    for r in [head, *rows]:
        cells = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..io.inspect import inspect_checkpoint

    result = inspect_checkpoint(args.checkpoint, revision=args.revision)
    try:
        print(json.dumps(result) if args.json else format_text(result), flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
