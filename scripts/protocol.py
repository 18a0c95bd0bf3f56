"""The quality protocol every quality benchmark shares, built from the library's own entry points.

builtin:smollm2-135m in fp32; calibration = 64 blocks x 512 tokens of builtin:imdb split train (seed 0),
batch size 1 (one gradient sample per block); evaluation = 64 windows x 512 tokens of split test
(seed 0 unless asked); targets = every Linear in the decoder layers (210 tensors). The whole-model
statistics every criterion reads are gathered once by the library's calibration loop and kept on disk
(`io.stats_files`), so each benchmark row is one `prune_(..., statistics=...)` call, exactly what a
user's sweep does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml

from llm_gradprune import JobConfig, PruneConfig
from llm_gradprune.calibration.data import load_samples, micro_batches, token_hash
from llm_gradprune.calibration.loop import gather_statistics
from llm_gradprune.io.stats_files import load_statistics, save_statistics
from llm_gradprune.job.inputs import calibration_samples, load, text_source
from llm_gradprune.targets import find_targets

ROOT = Path(__file__).resolve().parents[1]

JOB = {
    "model": "builtin:smollm2-135m",
    "dataset": "builtin:imdb",
    "num_samples": 64,
    "seq_len": 512,
    "batch_size": 1,
}
PRUNE_FIELDS = set(PruneConfig.__dataclass_fields__)


def recipe_settings(name: str, *, block: bool = True, **override) -> dict:
    """A recipe config's pruning settings (its job settings are the protocol's), with overrides; `block`
    False leaves out its block refit (the `block_*` settings), for rows that add their own or none."""
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    kw = {k: v for k, v in raw.items() if k in PRUNE_FIELDS and (block or not k.startswith("block_"))}
    return {**kw, **override}


WHOLE_STATS = {"grad_mean", "grad_abs_mean", "grad_sq_mean", "act_sq_mean", "token_grad_sq_mean"}
CACHE = ROOT / "out" / "bench_quality"


class Protocol:
    """The model, its targets and dense weights, calibration and held-out blocks."""

    def __init__(self, eval_seed: int = 0, eval_samples: int = 64):
        self.job = JobConfig.from_flat({**JOB, "progress": False})
        self.model, self.tokenizer, _ = load(self.job)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.targets = find_targets(self.model)
        self.dense = {n: m.weight.detach().clone() for n, m in self.targets.items()}
        self.calib = calibration_samples(self.job, self.tokenizer)
        self.eval_blocks = self.held_out(eval_seed, eval_samples)

    def held_out(self, seed: int, n: int = 64) -> torch.Tensor:
        return load_samples(
            text_source(self.job, split="test", seed=seed), self.tokenizer, n, self.job.seq_len
        )

    def batches(self) -> list[torch.Tensor]:
        return micro_batches(self.calib, 1)

    def restore_dense_(self) -> None:
        with torch.no_grad():
            for n, m in self.targets.items():
                m.weight.copy_(self.dense[n])

    def statistics(self, cache: Path = CACHE):
        """Every whole-model statistic of the dense model over the calibration blocks, cached on disk."""
        key = hashlib.sha256((token_hash(self.calib) + self.job.model).encode()).hexdigest()[:12]
        folder = cache / f"statistics_{key}"
        if (folder / "statistics.json").is_file():
            return load_statistics(folder, self.targets)
        self.restore_dense_()
        stats, counters = gather_statistics(self.model, self.batches(), WHOLE_STATS, self.targets,
                                            progress=True, num_batches=len(self.calib))  # fmt: skip
        save_statistics(folder, stats)
        print(f"calibration: {counters['seconds']:.0f} s, mean loss {counters['mean_loss']:.4f}", flush=True)
        return stats
