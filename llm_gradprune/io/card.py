"""The model card (README.md) written into every output."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_card(cfg, report: dict[str, Any]) -> str:
    sparsity = report["overall_sparsity"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pruned, sparse, llm-gradprune]",
        "---",
        f"# {Path(cfg.output_dir).name}",
        "",
        f"`{cfg.model}` pruned by [llm-gradprune](https://pypi.org/project/llm-gradprune/) to "
        f"{sparsity:.2%} zeros in its {report['targets']} target weight matrices "
        f"(criterion `{cfg.prune.criterion}`, scope `{report['scope']}`, pattern `{cfg.prune.pattern}`).",
        "",
        f"Calibration: {report['calibration']['batches']} micro-batches, {report['calibration']['tokens']} tokens "
        f"of `{cfg.dataset}` (split `{cfg.split}`).",
        "",
        "The zeros are stored densely: the checkpoint has the dense model's size and speed unless a sparse "
        "kernel (e.g. 2:4 on NVIDIA Ampere or newer) or a compressor uses them. `pruning_report.json` "
        "has per-tensor counts; `prune_config.yaml` repeats the run.",
    ]
    if report.get("eval"):
        ev = report["eval"]
        lines += ["", f"Held-out perplexity: dense {ev['dense_ppl']:.2f}, pruned {ev['pruned_ppl']:.2f}."]
    return "\n".join(lines) + "\n"
