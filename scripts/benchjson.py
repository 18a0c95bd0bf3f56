"""The merged benchmark records in docs/: one `docs/bench_<script>.json` per benchmark, shaped
`{key: {"commands": [...], "result": <what the script measured>}}`, one key per run or variant.

    python scripts/benchjson.py docs/bench_lsq.json            # the keys and their commands

Benchmarks import `record` and `result_of` from here (scripts/ is on the import path of a script).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: str | Path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def result_of(path: str | Path, key: str, default=None):
    """The result recorded under `key`; `default` when the file or the key is absent (None: an error)."""
    entry = load(path).get(key)
    if entry is None:
        if default is not None:
            return default
        raise SystemExit(f"{path}: no result under key {key!r} (keys: {', '.join(load(path)) or 'none'})")
    return entry["result"]


def record(path: str | Path, key: str, commands: list[str], result, *, append: bool = False) -> None:
    """Put `result` under `key`, the other keys untouched. The file is replaced whole (temporary file +
    os.replace) so a reader, or a run killed mid-write, never sees half a file. With `append` the
    commands are added to those already listed (a result that accumulates over several runs)."""
    path = Path(path)
    data = load(path)
    if append:
        old = data.get(key, {}).get("commands", [])
        commands = old + [c for c in commands if c not in old]
    data[key] = {"commands": list(commands), "result": result}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(args, result, *, append: bool = False) -> None:
    """Write a benchmark's `result` to `args.out` (its own JSON) and, with `args.record`, merge it into
    that record under `args.key` (default: threads_<args.threads>). `append`: a result that accumulates
    rows over several runs keeps every run's command line."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    if args.record:
        key = args.key or f"threads_{args.threads}"
        record(args.record, key, [command_line()], result, append=append)
        print(f"recorded it in {args.record} under {key}")


def command_line() -> str:
    """This process's command line as a reader reruns it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, help="a docs/bench_<script>.json file")
    ap.add_argument("--key", default=None, help="print this key's result as JSON")
    args = ap.parse_args(argv)
    if args.key:
        print(json.dumps(result_of(args.path, args.key), indent=1))
        return 0
    for key, entry in load(args.path).items():
        print(key)
        for cmd in entry.get("commands", []):
            print(f"    {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
