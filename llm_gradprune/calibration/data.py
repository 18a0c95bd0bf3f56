"""Text sources -> packed token blocks.

Three sources share one interface, `iter_texts`: the packaged IMDB reviews (`builtin:imdb`, offline),
local files (.txt, .jsonl/.json, .csv, .parquet through `datasets`' own loaders), and Hub data sets,
streamed so a user never downloads more than the blocks need. `pack_blocks` tokenizes texts without
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
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import ConfigError
from .assets import builtin_dataset_file

LOCAL_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
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

    from datasets import load_dataset  # heavy import, only for non-built-in sources

    path = Path(source)
    if path.exists() or path.suffix.lower() in LOCAL_LOADERS:
        if not path.is_file():
            raise ConfigError(f"dataset file {source!r} does not exist")
        loader = LOCAL_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise ConfigError(
                f"dataset file {source!r} has an unsupported type: use {', '.join(LOCAL_LOADERS)}"
            )
        _in_split(0, split, source)  # validate the split name before reading anything
        rows = load_dataset(loader, data_files=str(path), split="train")
        _check_column(rows.column_names, text_column, source)
        part = [i for i in range(len(rows)) if _in_split(i, split, source)]
        column = rows[text_column]
        for j in _permuted(len(part), seed):
            text = clean_text(column[part[j]] or "")
            if text:
                yield text
        return

    stream = load_dataset(source, dataset_config, split=split, streaming=True)
    stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    checked = False
    for row in stream:
        if not checked:
            _check_column(list(row), text_column, source)
            checked = True
        text = clean_text(row[text_column] or "")
        if text:
            yield text


def _check_column(columns: list[str], text_column: str, source: str) -> None:
    if text_column not in columns:
        raise ConfigError(
            f"text_column {text_column!r} is not in {source!r}: its columns are {', '.join(columns)}"
        )


def pack_blocks(
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


def load_blocks(
    cfg,
    tokenizer,
    split: str | None = None,
    num_blocks: int | None = None,
    seed: int | None = None,
    seq_len: int | None = None,
):
    """The calibration (or, with split=cfg.eval_split, evaluation) blocks a config describes."""
    split = split or cfg.split
    n = cfg.num_samples if num_blocks is None else num_blocks
    texts = iter_texts(
        cfg.dataset, split, cfg.text_column, cfg.seed if seed is None else seed, cfg.dataset_config
    )
    length = cfg.seq_len if seq_len is None else seq_len
    return pack_blocks(texts, tokenizer, n, length, source=f"{cfg.dataset}[{split}]")


def micro_batches(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive blocks grouped into micro-batches; the last one may be smaller."""
    return [blocks[i : i + batch_size] for i in range(0, len(blocks), batch_size)]


def shard(items: list, rank: int, world: int) -> list:
    """Round-robin share of one process: disjoint across ranks, together exactly `items`."""
    return items[rank::world]


def shard_samples(items: list, group: int, rank: int, world: int) -> list:
    """Round-robin share of whole groups of `group` consecutive items (with grad_accum, one gradient
    sample is a group of micro-batches: a rank must get all of a group or none of it)."""
    groups = [items[i : i + group] for i in range(0, len(items), group)]
    return [item for g in shard(groups, rank, world) for item in g]


def token_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()
