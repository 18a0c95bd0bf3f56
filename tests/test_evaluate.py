"""Perplexity: hand-known values on forced-logit models, a plain reference loop, and the eval CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_gradprune import commands as cli
from llm_gradprune.calibration.assets import resolve_model
from llm_gradprune.config import JobConfig
from llm_gradprune.errors import ConfigError
from llm_gradprune.evaluate import perplexity

from .conftest import make_blocks, make_tiny_llama


class Forced(nn.Module):
    """Logits chosen by hand: next token = (token + 1) % vocab with margin `margin`, else uniform."""

    def __init__(self, vocab: int, margin: float | None):
        super().__init__()
        self.vocab, self.margin = vocab, margin
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.margin is not None:
            logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], self.margin)
        return type("Out", (), {"logits": logits})()


def counting_blocks(n: int, seq_len: int, vocab: int) -> torch.Tensor:
    return (torch.arange(n * seq_len) % vocab).view(n, seq_len)


def test_perfect_prediction_has_perplexity_one():
    blocks = counting_blocks(5, 12, 16)
    r = perplexity(Forced(16, margin=200.0), blocks, batch_size=2, progress=False)
    assert r["ppl"] == pytest.approx(1.0, abs=1e-12)
    assert r["tokens"] == 5 * 11 and r["windows"] == 5


def test_uniform_prediction_has_perplexity_vocab():
    r = perplexity(Forced(16, margin=None), counting_blocks(3, 9, 16), progress=False)
    assert r["ppl"] == pytest.approx(16.0, rel=1e-6)


def test_known_margin_gives_known_perplexity():
    # p(right) = e^a / (e^a + 15): NLL = log(1 + 15 e^-a) for every scored token
    a = 2.0
    r = perplexity(Forced(16, margin=a), counting_blocks(2, 10, 16), stride=4, progress=False)
    assert r["ppl"] == pytest.approx(1 + 15 * math.exp(-a), rel=1e-6)


def reference_ppl(model, blocks, stride=None):
    """The textbook loop: one window at a time, NLL summed with cross_entropy (the HF docs' recipe)."""
    seq_len = blocks.shape[1]
    stream = blocks.reshape(-1)
    stride = stride or seq_len
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, stream.numel() - seq_len + 1, stride):
            end = begin + seq_len
            ids = stream[begin:end][None]
            target = ids.clone()
            target[:, : seq_len - (end - prev_end)] = -100  # score only tokens not scored before
            logits = model(input_ids=ids).logits
            losses = F.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100, reduction="sum")
            nll += float(losses)
            count += int((target[0, 1:] != -100).sum())
            prev_end = end
    return math.exp(nll / count), count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_reference_loop_on_tiny_llama(batch_size):
    model = make_tiny_llama()
    blocks = make_blocks(7, 16)
    ref, count = reference_ppl(model, blocks)
    r = perplexity(model, blocks, batch_size=batch_size, progress=False)
    assert r["tokens"] == count == 7 * 15
    assert r["ppl"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("stride", [4, 8])
def test_stride_matches_reference_loop(stride):
    model = make_tiny_llama()
    blocks = make_blocks(4, 16)  # 64 tokens: (64 - 16) % stride == 0, so both loops end together
    ref, count = reference_ppl(model, blocks, stride=stride)
    r = perplexity(model, blocks, batch_size=2, stride=stride, progress=False)
    assert r["tokens"] == count == 63  # every token but the first is scored exactly once
    assert r["ppl"] == pytest.approx(ref, rel=1e-5)
    assert r["ppl"] != pytest.approx(perplexity(model, blocks, progress=False)["ppl"], rel=1e-4)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny random Llama saved with the built-in SmolLM2 tokenizer: a model folder the CLI can read."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m"))
    model = make_tiny_llama(vocab=len(tok))
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_eval_cli_json_matches_library(tiny_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_gradprune.calibration.data import TextSource, load_samples

    argv = ["eval", str(tiny_dir), "--eval-num-samples", "3", "--eval-seq-len", "32", "--eval-batch-size", "2",
            "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    source = TextSource("builtin:imdb", split="test")
    blocks = load_samples(source, AutoTokenizer.from_pretrained(tiny_dir), num_blocks=3, seq_len=32)
    want = perplexity(AutoModelForCausalLM.from_pretrained(tiny_dir), blocks, progress=False)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert got["tokens"] == 3 * 31 and got["dataset"]["split"] == "test"


def test_eval_cli_bad_split_is_one_line(tiny_dir, capsys):
    assert (
        cli.main(
            ["eval", str(tiny_dir), "--eval-split", "dev", "--eval-num-samples", "1", "--eval-seq-len", "8"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert err.startswith("llm-gradprune: error: split 'dev'")


def test_prune_eval_records_dense_and_pruned(tiny_dir, tmp_path):
    from llm_gradprune.job import eval_job, prune_job

    common = {"model": str(tiny_dir), "seq_len": 32, "progress": False, "eval_num_samples": 2}
    cfg = JobConfig.from_flat({**common, "criterion": "wanda", "num_samples": 2, "eval": True,
                               "output_dir": str(tmp_path / "o")})  # fmt: skip
    report = prune_job(cfg)
    ev = report["eval"]
    dense = eval_job(JobConfig.from_flat(common))
    pruned = eval_job(JobConfig.from_flat({**common, "model": str(tmp_path / "o")}))
    assert ev["dense_ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
    assert ev["pruned_ppl"] == pytest.approx(pruned["ppl"], rel=1e-5)
    assert ev["dense_ppl"] != pytest.approx(ev["pruned_ppl"], rel=1e-4)
    assert ev["token_sha256"] == dense["token_sha256"] and ev["tokens"] == 2 * 31
    card = (tmp_path / "o" / "README.md").read_text()
    assert f"| dense | {ev['dense_ppl']:.2f} |" in card and f"| pruned | {ev['pruned_ppl']:.2f} |" in card


@pytest.mark.parametrize(
    ("kw", "bad"),
    [({"eval_num_samples": 0}, "eval_num_samples 0"), ({"eval_stride": -1}, "eval_stride -1"),
     ({"eval_batch_size": 1.5}, "eval_batch_size 1.5")],
)  # fmt: skip
def test_bad_eval_values(kw, bad):
    with pytest.raises(ConfigError, match=bad):
        JobConfig(**kw)
