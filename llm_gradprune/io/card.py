"""The model card (README.md) written into every output: front matter the Hub reads, and a body a user can
trust: what was done, with which data, what it measured, how to load it and how to repeat it.

Names are ones a user can read: the base model's Hub id (a built-in's upstream id) or a local folder's
own name, never a local absolute path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..scoring.criteria import CRITERIA
from .plots import layer_projection_table

ZEROS_PARAGRAPH = (
    "The zeros are stored densely: this checkpoint has the dense model's size and runs at its speed in plain "
    "PyTorch/transformers. They pay off only with a sparse kernel or a compressor. 2:4 is the one pattern with "
    "broad hardware support (NVIDIA Ampere and newer, e.g. through `torch.sparse.to_sparse_semi_structured`, "
    "about 1.5-2x on the matmuls)."
)
LOCAL_KEYS = ("output_dir", "state_dir", "scores_dir")


def _readable(value: str | None) -> str | None:
    """A local path shown by its last part; anything else as it is."""
    if value is None:
        return None
    s = str(value)
    return Path(s).name if s.startswith(("/", "~", ".")) else s


def readable_config(cfg, report: dict[str, Any]) -> dict[str, Any]:
    """The run's settings with names a user can read (base model id, file and folder names)."""
    flat = cfg.to_flat()
    for key in ("model", "dataset", *LOCAL_KEYS):  # built-ins and Hub ids stay as they are
        flat[key] = _readable(flat.get(key))
    return flat


def front_matter(cfg, report: dict[str, Any]) -> dict[str, Any]:
    base = report.get("base_model") or {}
    meta: dict[str, Any] = {}
    if base.get("hub_id"):
        meta["base_model"] = base["hub_id"]
    if base.get("license"):
        meta["license"] = base["license"]
    if report.get("calibration_dataset"):
        meta["datasets"] = [report["calibration_dataset"]]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["pruned", "sparse", "llm-gradprune", report["pattern"], report["criterion"]]
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def sparsity_table(per_tensor: dict[str, dict[str, Any]]) -> list[str]:
    layers, projections, cells = layer_projection_table(per_tensor)
    lines = ["| layer | " + " | ".join(projections) + " |", "|---" * (len(projections) + 1) + "|"]
    for layer in layers:
        row = [f"{cells[layer, p]:.1%}" if (layer, p) in cells else "-" for p in projections]
        lines.append(f"| {layer} | " + " | ".join(row) + " |")
    return lines


def loading_snippet(model_id: str) -> list[str]:
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
        "```",
    ]


def model_card(cfg, report: dict[str, Any], model_id: str | None = None) -> str:
    """README.md for the output folder. `model_id`: what the loading snippet loads (the Hub repo when
    pushed; by default the output folder's own name, loadable from the folder above it)."""
    crit = CRITERIA.get(report["criterion"])
    base = report.get("base_model") or {"name": _readable(cfg.model)}
    model_id = model_id or Path(cfg.output_dir).name
    kind = (
        f"{report['pattern']} sparse"
        if report["pattern"] != "unstructured"
        else f"{report['overall_sparsity']:.0%} sparse"
    )
    params = ", ".join(f"{k}={v}" for k, v in report["criterion_params"].items())
    cal = report["calibration"]
    # a library call's report lacks the job's keys: they come from the job config then
    dataset = report.get("dataset") or {"name": cfg.dataset, "split": cfg.split}
    data = _readable(dataset["name"])
    lines = [
        "---",
        yaml.safe_dump(front_matter(cfg, report), sort_keys=False).strip(),
        "---",
        f"# {base['name']}, {kind} ({report['criterion']})",
        "",
        f"`{base.get('hub_id') or base['name']}` pruned by [llm-gradprune](https://pypi.org/project/llm-gradprune/): "
        f"{report['overall_sparsity']:.2%} of the weights of its {report['targets']} target matrices "
        f"({report['target_weights']:,} weights: every Linear inside the decoder layers) are exactly zero. "
        "Embeddings, norms and the language-model head are untouched.",
        "",
        "## Method",
        "",
        f"- criterion `{report['criterion']}`: {crit.help}; score {crit.formula}"
        + (f" ({params})" if params else ""),
        f"- target sparsity {report['target_sparsity']:g}, scope `{report['scope']}`, pattern `{report['pattern']}`, "
        f"allocation `{report['allocation_method']}`",
        f"- weight update `{report['mode']['reconstruct']}` ({report['mode']['executor'].replace('_', '-')} executor)",
        f"- calibration: {cal['batches']} micro-batches of {cal.get('batch_size', '?')} x {cal.get('seq_len', '?')} "
        f"tokens ({cal['tokens']:,} tokens) of `{data}` (split `{dataset['split']}`), seed {report.get('seed', cfg.seed)}",
        "",
        "## Sparsity per layer and projection",
        "",
        *sparsity_table(report["per_tensor"]),
    ]
    plots = (report.get("plots") or {}).get("files", [])
    if "sparsity.png" in plots:
        lines += ["", "![sparsity per layer and projection](sparsity.png)"]
    rec = report.get("recovery")
    if rec:
        kind = f"LoRA rank {rec['lora_r']} merged through the mask" if rec["lora_r"] else "the target weights"
        loss = f"{rec['distill_alpha']:g} x KL(teacher || student) + {1 - rec['distill_alpha']:g} x next-token loss" \
            if rec["distill_alpha"] else "next-token loss"  # fmt: skip
        lines += ["", "## Recovery training", "",
                  f"After pruning, {rec['steps']} AdamW steps ({rec['tokens']:,} tokens, lr {rec['lr']:g}, "
                  f"{rec['schedule']}) trained {kind} on {loss}"
                  + (f" from `{_readable(rec['teacher'])}`" if rec.get("teacher") else "")
                  + f", text `{_readable(rec['data']['name'])}` split `{rec['data']['split']}`. Every pruned weight "
                  "stayed exactly zero (gradients masked, masks re-applied after each step)."]  # fmt: skip
        if "recovery_loss.png" in plots:
            lines += ["", "![recovery loss](recovery_loss.png)"]
    ev = report.get("eval")
    if ev:
        lines += ["", "## Held-out perplexity", "", "| model | perplexity |", "|---|---|"]
        if ev.get("dense_ppl") is not None:
            lines.append(f"| dense | {ev['dense_ppl']:.2f} |")
        lines.append(f"| pruned | {ev['pruned_ppl']:.2f} |")
        if ev.get("recovered_ppl") is not None:
            lines.append(f"| pruned + recovery | {ev['recovered_ppl']:.2f} |")
        lines += ["", f"{ev['windows']} windows of {ev['seq_len']} tokens ({ev['tokens']:,} scored tokens) of "
                  f"`{data}` split `{ev['split']}`, never seen in calibration."]  # fmt: skip
        if "perplexity.png" in plots:
            lines += ["", "![held-out perplexity](perplexity.png)"]
    tasks = report.get("eval_tasks")
    if tasks:
        lines += [
            "",
            "## Task scores (lm-evaluation-harness)",
            "",
            "| task | metric | dense | pruned |",
            "|---|---|---|---|",
        ]
        for task, metrics in tasks["pruned"].items():
            for metric, value in metrics.items():
                if metric in ("samples",) or metric.endswith("_stderr"):
                    continue
                dense = tasks.get("dense", {}).get(task, {}).get(metric)
                lines.append(f"| {task} | {metric} | {dense:.4f} | {value:.4f} |" if dense is not None
                             else f"| {task} | {metric} | - | {value:.4f} |")  # fmt: skip
        lines += ["", f"lm-eval {tasks['lm_eval_version']}, {tasks['num_fewshot']} shots; `acc` is the accuracy of the "
                  "highest log-likelihood choice, `acc_norm` the same with the log-likelihood divided by the "
                  "choice's length in bytes."]  # fmt: skip
    if report.get("plots", {}).get("skipped"):
        lines += ["", f"(Plots skipped: {report['plots']['skipped']}.)"]
    lines += [
        "",
        "## Use",
        "",
        *loading_snippet(model_id),
        "",
        "## Reproduce",
        "",
        "`prune_config.yaml` in this folder holds every setting of the run; with the same base model and text:",
        "",
        "```bash",
        "llm-gradprune prune --config prune_config.yaml",
        "```",
        "",
        "<details><summary>the settings</summary>",
        "",
        "```yaml",
        yaml.safe_dump(readable_config(cfg, report), sort_keys=False).strip(),
        "```",
        "",
        "</details>",
        "",
        "## What the zeros buy",
        "",
        ZEROS_PARAGRAPH,
        "",
        "`pruning_report.json` has the per-tensor counts, the calibration's token hash, versions and timings.",
    ]
    return "\n".join(lines) + "\n"
