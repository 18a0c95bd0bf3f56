"""Text sources -> packed token blocks.

Three sources share one interface, `iter_texts`: the packaged IMDB reviews (`builtin:imdb`, offline),
local files (.txt, .jsonl/.json, .csv, .parquet through `datasets`' own loaders), and Hub data sets,
streamed so a user never downloads more than the blocks need. `pack_samples` tokenizes texts without
special tokens, joins them with EOS and cuts exactly `num_blocks` blocks of `seq_len` tokens: no
padding, so every token counts.

Built-in and local-file sources have no published held-out split, so every 10th row (row index % 10 ==
0) forms the held-out part (`test`/`heldout`) and the rest the calibration part (`train`/`calibration`):
calibration never reads a held-out row. IMDB repeats some reviews verbatim, so the built-in calibration
part also skips any review whose text equals a held-out one.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import reprlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, hub_unreachable, unreachable
from .assets import builtin_dataset_file, unreachable_path

HELDOUT_EVERY = 10
TRAIN_SPLITS = ("train", "calibration")
HELDOUT_SPLITS = ("test", "heldout")
SHUFFLE_BUFFER = 10_000


def clean_text(text: str) -> str:
    return text.replace("<br />", "\n").replace("<br/>", "\n").strip()


def _in_split(index: int, split: str, source: str) -> bool:
    if split in TRAIN_SPLITS:
        return index % HELDOUT_EVERY != 0
    if split in HELDOUT_SPLITS:
        return index % HELDOUT_EVERY == 0
    if split == "all":
        return True
    allowed = ", ".join(TRAIN_SPLITS + HELDOUT_SPLITS + ("all",))
    raise ConfigError(f"split {split!r} is not available for {source!r}: choose one of {allowed}")


def _builtin_imdb_rows() -> list[str]:
    csv.field_size_limit(sys.maxsize)
    with open(builtin_dataset_file("builtin:imdb"), newline="", encoding="utf-8") as fh:
        return [clean_text(row["text"]) for row in csv.DictReader(fh) if row["source"] == "imdb"]


def _permuted(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def iter_texts(
    source: str,
    split: str = "train",
    text_column: str = "text",
    seed: int = 0,
    dataset_config: str | None = None,
) -> Iterator[str]:
    """Yield cleaned, non-empty texts of one split in a seed-determined order."""
    if source.startswith("builtin:"):
        if source != "builtin:imdb":
            builtin_dataset_file(source)  # raises: no other built-in data set exists
        rows = _builtin_imdb_rows()
        part = [t for i, t in enumerate(rows) if _in_split(i, split, source)]
        # IMDB repeats some reviews verbatim: a calibration text equal to a held-out one is skipped.
        heldout = (
            {t for i, t in enumerate(rows) if _in_split(i, "test", source)}
            if split in TRAIN_SPLITS
            else set()
        )
        for i in _permuted(len(part), seed):
            if part[i] and part[i] not in heldout:
                yield part[i]
        return

    path = Path(source)
    if path.exists() or path.suffix.lower() in LOCAL_READERS:
        column = local_column(path, text_column, split)
        part = [i for i in range(len(column)) if _in_split(i, split, source)]
        if not part:
            raise ConfigError(
                f"dataset file {source!r} holds {len(column)} row(s), and every {HELDOUT_EVERY}th row (row 0, "
                f"{HELDOUT_EVERY}, ...) is held out for evaluation, so its {split!r} part is empty: give more rows"
            )
        for j in _permuted(len(part), seed):
            text = clean_text(column[part[j]] or "")
            if text:
                yield text
        return

    yield from _hub_texts(source, split, text_column, seed, dataset_config)


def _read_txt(path: Path) -> tuple[list[str], dict[str, list]]:
    return ["text"], {"text": path.read_text(encoding="utf-8").splitlines()}


def _read_json(path: Path) -> tuple[list[str], dict[str, list]]:
    raw = path.read_text(encoding="utf-8")
    try:  # a JSON array of objects, or one object per line
        rows = (
            json.loads(raw)
            if raw.lstrip().startswith("[")
            else [json.loads(x) for x in raw.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"dataset file {str(path)!r} is not valid JSON lines: {err.msg} at line {err.lineno}"
        ) from None
    if not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"dataset file {str(path)!r} must hold one JSON object per row")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return columns, {c: [r.get(c) for r in rows] for c in columns}


def _read_csv(path: Path) -> tuple[list[str], dict[str, list]]:
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    return columns, {c: [r.get(c) for r in rows] for c in columns}


def _read_parquet(path: Path) -> tuple[list[str], dict[str, list]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        raise ConfigError(f"dataset file {str(path)!r} is not a readable parquet file: {err}") from None
    return table.column_names, {c: table.column(c).to_pylist() for c in table.column_names}


# suffix -> reader: local files are read directly (no copy lands in a data-set cache)
LOCAL_READERS = {".txt": _read_txt, ".jsonl": _read_json, ".json": _read_json, ".csv": _read_csv,
                 ".parquet": _read_parquet}  # fmt: skip


def local_column(path: Path, text_column: str, split: str) -> list:
    """Every row's value in the text column of a local file (one row per line of a .txt)."""
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"dataset file {source!r} {unreachable_path(path) or 'is a folder, not a file'}")
    reader = LOCAL_READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"dataset file {source!r} has an unsupported type: use {', '.join(LOCAL_READERS)}")
    _in_split(0, split, source)  # validate the split name before reading anything
    if path.stat().st_size == 0:
        raise ConfigError(f"dataset file {source!r} is empty")
    try:
        columns, values = reader(path)
    except UnicodeDecodeError:
        raise ConfigError(f"dataset file {source!r} is not UTF-8 text") from None
    _check_column(columns, text_column, source)
    for row, value in enumerate(values[text_column]):
        _check_text(value, text_column, row, source)
    return values[text_column]


def _hub_texts(
    source: str, split: str, text_column: str, seed: int, dataset_config: str | None
) -> Iterator[str]:
    """A Hub data set, streamed: only the rows the blocks need are downloaded."""
    from datasets import load_dataset  # heavy import, only for Hub sources

    try:
        stream = load_dataset(source, dataset_config, split=split, streaming=True)
        stream = iter(stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER))
        first = next(stream, None)
    except Exception as err:  # noqa: BLE001 - sorted below: unreachable, missing, or a real bug
        if unreachable(err):
            raise ConfigError(hub_unreachable("dataset", source)) from None
        if isinstance(err, FileNotFoundError | ValueError) or type(err).__name__ in ("DatasetNotFoundError",):
            raise ConfigError(
                f"dataset {source!r} cannot be read: {str(err).strip().splitlines()[0]}"
            ) from None
        raise
    if first is None:
        return
    _check_column(list(first), text_column, source)
    for index, row in enumerate(itertools.chain([first], stream)):
        _check_text(row[text_column], text_column, index, source)
        text = clean_text(row[text_column] or "")
        if text:
            yield text


def _check_column(columns: list[str], text_column: str, source: str) -> None:
    if text_column not in columns:
        raise ConfigError(
            f"text_column {text_column!r} is not in {source!r}: its columns are {', '.join(columns)}"
        )


def _check_text(value, text_column: str, row: int, source: str) -> None:
    """A number or a list where text belongs is refused, never turned into text nobody wrote."""
    if value is not None and not isinstance(value, str):
        shown = f"{type(value).__name__} {reprlib.repr(value)}"
        raise ConfigError(
            f"text_column {text_column!r} of {source!r} holds {shown} at row {row}, not text: give a column of strings"
        )


def pack_samples(
    texts: Iterable[str], tokenizer, num_blocks: int, seq_len: int, source: str = "data set", batch: int = 64
) -> torch.Tensor:
    """Tokenize, join with EOS and cut exactly `num_blocks` x `seq_len` tokens (int64)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token to join texts"
        )
    need = num_blocks * seq_len
    ids: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        for seq in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            flush()
            if len(ids) >= need:
                break
    if pending and len(ids) < need:
        flush()
    if not ids:
        raise ConfigError(f"{source!r} holds no non-empty text: is its text column empty?")
    if len(ids) < need:
        possible = len(ids) // seq_len
        raise ConfigError(
            f"{source!r} holds {len(ids)} tokens: enough for {possible} blocks of {seq_len}, "
            f"but num_samples asks for {num_blocks}"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(num_blocks, seq_len)


@dataclass(frozen=True)
class TextSource:
    """Where text is read from: a data set (built-in, Hub id or local file), its split and column, and
    the seed of the document order."""

    dataset: str
    split: str = "train"
    text_column: str = "text"
    seed: int = 0
    dataset_config: str | None = None

    @property
    def name(self) -> str:
        return f"{self.dataset}[{self.split}]"


def load_samples(source: TextSource, tokenizer, num_blocks: int, seq_len: int) -> torch.Tensor:
    """`num_blocks` x `seq_len` tokens of `source`, packed (see `pack_samples`)."""
    texts = iter_texts(source.dataset, source.split, source.text_column, source.seed, source.dataset_config)
    return pack_samples(texts, tokenizer, num_blocks, seq_len, source=source.name)


def micro_batches(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive blocks grouped into micro-batches; the last one may be smaller."""
    return [blocks[i : i + batch_size] for i in range(0, len(blocks), batch_size)]


def round_robin(items: list, rank: int, world: int) -> list:
    """Round-robin share of one process: disjoint across ranks, together exactly `items`."""
    return items[rank::world]


def round_robin_chunks(items: list, group: int, rank: int, world: int) -> list:
    """Round-robin share of whole groups of `group` consecutive items (with grad_accum, one gradient
    sample is a group of micro-batches: a rank must get all of a group or none of it)."""
    groups = [items[i : i + group] for i in range(0, len(items), group)]
    return [item for g in round_robin(groups, rank, world) for item in g]


def merge_round_robin_chunks(parts: list[list], group: int) -> list:
    """The inverse of `round_robin_chunks`: every rank's share (`parts`, in rank order) back in the
    order of the items one process gets."""
    groups = [[p[i : i + group] for i in range(0, len(p), group)] for p in parts]
    rounds = max((len(g) for g in groups), default=0)
    return [item for k in range(rounds) for g in groups if k < len(g) for item in g[k]]


def token_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()
