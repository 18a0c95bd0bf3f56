"""A tiny random Llama saved as a real model folder, with a crafted word-level tokenizer and a text file.

Used by the reliability tests, which drive the whole pipeline (CLI, model loading, data files, saving)
offline and in seconds: 128 words, 2 layers, hidden 32. `start_cli` + `kill_when_paused` run the CLI in
a subprocess and SIGKILL it at a fault-injection point (llm_gradprune/faults.py).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from llm_gradprune.faults import MARKER, PAUSE_ENV

ROOT = Path(__file__).resolve().parents[1]

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


def _default_sigint() -> None:
    # background jobs of a non-interactive shell start with SIGINT ignored, which the child would inherit
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], pause: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    cmd = [sys.executable, "-m", "llm_gradprune", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # fmt: skip


def signal_when_paused(proc: subprocess.Popen, sig: int, timeout: float = 120) -> tuple[int, str]:
    """Wait for the pause marker, send `sig`, and return (exit code, everything on stderr after it)."""
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        if line.startswith(MARKER):
            proc.send_signal(sig)
            rest = proc.stderr.read()
            return proc.wait(timeout=60), rest
        assert time.monotonic() < deadline, "timed out waiting for the pause"
    proc.wait()
    raise AssertionError(f"run ended (rc {proc.returncode}) without pausing")


def kill_when_paused(proc: subprocess.Popen, timeout: float = 120) -> str:
    """Wait for the pause marker on stderr, then SIGKILL: the process cannot clean anything up."""
    deadline = time.monotonic() + timeout
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(MARKER):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "".join(lines)
        assert time.monotonic() < deadline, "timed out waiting for the pause"
    proc.wait()
    raise AssertionError(f"run ended (rc {proc.returncode}) without pausing:\n{''.join(lines)[-3000:]}")
