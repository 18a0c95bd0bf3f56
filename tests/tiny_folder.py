"""A tiny random Llama saved as a real model folder, with a crafted word-level tokenizer and a text file.

Used by the reliability tests, which drive the whole pipeline (CLI, model loading, data files, saving)
offline and in seconds: 128 words, 2 layers, hidden 32.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(126)]
EOS, UNK = "<eos>", "<unk>"


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*WORDS, EOS, UNK])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=UNK)


def make_model_folder(path: Path, seed: int = 0, **kw) -> Path:
    """save_pretrained of conftest's tiny Llama (safetensors) plus the word tokenizer."""
    from .conftest import make_tiny_llama

    path = Path(path)
    make_tiny_llama(seed=seed, **kw).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_text_file(path: Path, lines: int = 200, words: int = 30, seed: int = 0) -> Path:
    """Lines of random words: `lines * 0.9 * (words + 1)` calibration tokens (every 10th line is held out)."""
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(lines))
    Path(path).write_text(text + "\n")
    return Path(path)
