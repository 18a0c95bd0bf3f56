"""Text sources and packing: exact block counts, EOS joins, disjoint held-out part, local files."""

import json

import pytest
import torch

from llm_gradprune.calibration.data import iter_texts, micro_batches, pack_samples, round_robin
from llm_gradprune.config import ConfigError


class CharTokenizer:
    """One token per character: enough to check packing by hand."""

    eos_token_id = 0
    name_or_path = "chars"

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_pack_joins_with_eos_and_cuts_exact_blocks():
    blocks = pack_samples(["ab", "cde", "f"], CharTokenizer(), num_blocks=2, seq_len=4)
    assert blocks.tolist() == [[97, 98, 0, 99], [100, 101, 0, 102]]


def test_pack_reports_how_many_blocks_fit():
    with pytest.raises(ConfigError, match="enough for 1 blocks of 4"):
        pack_samples(["abcdef"], CharTokenizer(), num_blocks=3, seq_len=4)


def test_builtin_imdb_heldout_is_disjoint_and_seeded():
    train = list(iter_texts("builtin:imdb", "train", seed=0))
    test = list(iter_texts("builtin:imdb", "test", seed=0))
    assert len(test) == 2500 and 22_400 < len(train) < 22_500  # held-out copies skipped
    assert not set(train) & set(test)
    assert all("<br />" not in t for t in train[:200])
    again = list(iter_texts("builtin:imdb", "train", seed=0))[:50]
    other = list(iter_texts("builtin:imdb", "train", seed=1))[:50]
    assert again == train[:50] and other != train[:50]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path, suffix):
    rows = [f"review number {i}<br />end" for i in range(30)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(rows) + "\n")
        column = "text"
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"body": r}) for r in rows) + "\n")
        column = "body"
    else:
        import pandas as pd

        df = pd.DataFrame({"body": rows})
        df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
        column = "body"
    texts = list(iter_texts(str(path), "all", text_column=column))
    assert sorted(texts) == sorted(r.replace("<br />", "\n") for r in rows)
    assert len(list(iter_texts(str(path), "train", text_column=column))) == 27


def test_wrong_column_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match="'text' is not in .*: its columns are body"):
        list(iter_texts(str(path), "train", text_column="text"))


def test_sharding_is_disjoint_and_complete():
    batches = micro_batches(torch.arange(10).view(5, 2), 2)  # 3 micro-batches, the last one smaller
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    shards = [round_robin(batches, r, 2) for r in range(2)]
    seen = torch.cat([b.reshape(-1) for s in shards for b in s]).sort().values
    assert torch.equal(seen, torch.arange(10))
