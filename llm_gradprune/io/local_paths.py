"""Local paths stay on this machine: what an output folder shows (prune_config.yaml, pruning_report.json,
the card) names a local model, data file or folder by its last part, as the card always did; the full
paths the report held are kept in the folder's `.llm-gradprune-local.json`, a dotfile push never sends,
so `recover` on this machine still finds the dense base model (its default teacher).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOCAL_RECORD = ".llm-gradprune-local.json"


def readable_name(value: Any) -> Any:
    """A local path (starting with /, ~ or .) shown by its last part; anything else as it is."""
    if not isinstance(value, str) or not value.startswith(("/", "~", ".")):
        return value
    return Path(value).name or value


def split_local(obj: Any, at: tuple = ()) -> tuple[Any, list[list]]:
    """(`obj` with every local path replaced by its readable name, [[key path, original], ...])."""
    if isinstance(obj, dict):
        pairs = {k: split_local(v, (*at, k)) for k, v in obj.items()}
        return {k: v for k, (v, _) in pairs.items()}, [x for _, found in pairs.values() for x in found]
    if isinstance(obj, list | tuple):
        pairs = [split_local(v, (*at, i)) for i, v in enumerate(obj)]
        return [v for v, _ in pairs], [x for _, found in pairs for x in found]
    shown = readable_name(obj)
    return shown, ([[list(at), obj]] if shown != obj else [])


def restore_local(obj: Any, originals: list[list]) -> Any:
    """Put the originals `split_local` took back where the readable names still stand."""
    for at, original in originals:
        parent = obj
        try:
            for key in at[:-1]:
                parent = parent[key]
            if parent[at[-1]] == readable_name(original):
                parent[at[-1]] = original
        except (KeyError, IndexError, TypeError):
            continue  # the report changed shape since: leave the readable name
    return obj


def write_local_record(folder: Path, report_paths: list[list]) -> None:
    (folder / LOCAL_RECORD).write_text(json.dumps({"report": report_paths}, indent=1) + "\n")


def read_local_record(folder: Path) -> list[list]:
    """The report's local paths saved beside it (none when the folder came from elsewhere)."""
    path = folder / LOCAL_RECORD
    try:
        found = json.loads(path.read_text())["report"] if path.is_file() else []
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []
    return [x for x in found if isinstance(x, list) and len(x) == 2 and isinstance(x[0], list) and x[0]]
