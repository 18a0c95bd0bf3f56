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


def readable_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The run's settings with names a user can read (base model id, file and folder names)."""
    flat = dict(settings)
    for key in ("model", "dataset", *LOCAL_KEYS):  # built-ins and Hub ids stay as they are
        if key in flat:
            flat[key] = _readable(flat[key])
    return flat


def front_matter(report: dict[str, Any]) -> dict[str, Any]:
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
    if report.get("structure"):
        tags = [
            "pruned",
            "structured-pruning",
            "llm-gradprune",
            report["structure"],
            report["importance"]["name"],
        ]
    else:
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


def model_card(settings: dict[str, Any], report: dict[str, Any], model_id: str | None = None) -> str:
    """README.md for the output folder. `settings`: the run's flat settings (what prune_config.yaml
    holds); a library call's report lacks the job's keys (model, data set, seed), they come from there.
    `model_id`: what the loading snippet loads (the Hub repo when pushed; by default the output folder's
    own name, loadable from the folder above it)."""
    if report.get("structure"):
        return structured_card(settings, report, model_id)
    crit = CRITERIA.get(report["criterion"])
    base = report.get("base_model") or {"name": _readable(settings.get("model"))}
    model_id = model_id or Path(settings.get("output_dir") or "pruned").name
    kind = (
        f"{report['pattern']} sparse"
        if report["pattern"] != "unstructured"
        else f"{report['overall_sparsity']:.0%} sparse"
    )
    params = ", ".join(f"{k}={v}" for k, v in report["criterion_params"].items())
    cal = report["calibration"]
    dataset = report.get("dataset") or {"name": settings.get("dataset"), "split": settings.get("split")}
    data = _readable(dataset["name"])
    lines = [
        "---",
        yaml.safe_dump(front_matter(report), sort_keys=False).strip(),
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
        f"tokens ({cal['tokens']:,} tokens) of `{data}` (split `{dataset['split']}`), seed {report.get('seed', settings.get('seed'))}",
        "",
        "## Sparsity per layer and projection",
        "",
        *sparsity_table(report["per_tensor"]),
    ]
    plots = (report.get("plots") or {}).get("files", [])
    if "sparsity.png" in plots:
        lines += ["", "![sparsity per layer and projection](sparsity.png)"]
    lines += outcome_lines(report, data)
    lines += usage_lines(settings, model_id)
    lines += [
        "## What the zeros buy",
        "",
        ZEROS_PARAGRAPH,
        "",
        "`pruning_report.json` has the per-tensor counts, the calibration's token hash, versions and timings.",
    ]
    return "\n".join(lines) + "\n"


def outcome_lines(report: dict[str, Any], data: str) -> list[str]:
    """Recovery, held-out perplexity, task scores and skipped plots: the same in every card."""
    lines: list[str] = []
    plots = (report.get("plots") or {}).get("files", [])
    rec = report.get("recovery")
    if rec:
        kind = f"LoRA rank {rec['lora_r']} merged through the mask" if rec["lora_r"] else "the target weights"
        loss = f"{rec['distill_alpha']:g} x KL(teacher || student) + {1 - rec['distill_alpha']:g} x next-token loss" \
            if rec["distill_alpha"] else "next-token loss"  # fmt: skip
        lines += ["", "## Recovery training", "",
                  f"After pruning, {rec['steps']} AdamW steps ({rec['tokens']:,} tokens, lr {rec['lr']:g}, "
                  f"{rec['schedule']}) trained {kind} on {loss}"
                  + (f" from `{_readable(rec['teacher'])}`" if rec.get("teacher") else "")
                  + f", text `{_readable(rec['data']['name'])}` split `{rec['data']['split']}`. "
                  + ("The removed units are gone from the shapes; the weights that were exactly zero stayed zero."
                     if report.get("structure") else
                     "Every pruned weight stayed exactly zero (gradients masked, masks re-applied after each step).")]  # fmt: skip
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
    if (report.get("plots") or {}).get("skipped"):
        lines += ["", f"(Plots skipped: {report['plots']['skipped']}.)"]
    return lines


def usage_lines(settings: dict[str, Any], model_id: str) -> list[str]:
    """How to load the folder and how to repeat the run."""
    lines: list[str] = []
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
        yaml.safe_dump(readable_config(settings), sort_keys=False).strip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return lines


STRUCTURED_PARAGRAPH = (
    "Whole units are gone, so this is a smaller dense model: fewer parameters, a smaller file, and faster in "
    "plain PyTorch/transformers with no sparse kernel. Its config is a stock one with smaller widths, head "
    "counts or layer count, so `AutoModelForCausalLM.from_pretrained` loads it without remote code."
)
SHAPE_NAMES = (("num_hidden_layers", "decoder layers"), ("intermediate_size", "MLP channels per layer"),
               ("num_attention_heads", "query heads per layer"), ("num_key_value_heads", "key/value heads per layer"))  # fmt: skip


def structured_card(settings: dict[str, Any], report: dict[str, Any], model_id: str | None = None) -> str:
    """README.md of a structured run's output: the new shape, parameters and file size before and after."""
    base = report.get("base_model") or {"name": _readable(settings.get("model"))}
    model_id = model_id or Path(settings.get("output_dir") or "pruned").name
    imp, comp = report["importance"], report["compensation"]
    before, after = report["params_before"], report["params_after"]
    dataset = report.get("dataset") or {"name": settings.get("dataset"), "split": settings.get("split")}
    data = _readable(dataset["name"])
    cal = report.get("calibration") or {}
    meta = front_matter(report)
    form = f" ({imp['form']} form)" if imp.get("form") else ""
    refit = ("none (sliced only)" if comp["compensate"] == "none" else
             f"least-squares refit of down_proj / o_proj on {comp['refit_inputs']} calibration inputs")  # fmt: skip
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        f"# {base['name']}, {report['decoder_kept']:.0%} of the decoder ({report['structure']}, {imp['name']})",
        "",
        f"`{base.get('hub_id') or base['name']}` made smaller by [llm-gradprune](https://pypi.org/project/llm-gradprune/) "
        f"structured pruning: whole {report['structure'] if report['structure'] != 'mixed' else 'channels, heads and layers'} "
        f"removed, keeping {after['decoder']:,} of {before['decoder']:,} decoder parameters "
        f"({report['decoder_kept']:.1%}); {after['total']:,} parameters in all (was {before['total']:,}).",
        "",
        "## Shape",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    for key, label in SHAPE_NAMES:
        lines.append(f"| {label} | {report['shape_before'][key]} | {report['shape_after'][key]} |")
    lines.append(f"| parameters | {before['total']:,} | {after['total']:,} |")
    if report.get("file_bytes_before") and report.get("file_bytes"):
        lines.append(f"| safetensors bytes | {report['file_bytes_before']:,} | {report['file_bytes']:,} |")
    elif report.get("file_bytes"):
        lines.append(f"| safetensors bytes | - | {report['file_bytes']:,} |")
    plots = (report.get("plots") or {}).get("files", [])
    if "shape.png" in plots:
        lines += ["", "![kept share of each kind of unit](shape.png)"]
    removed = report["removed"]
    lines += [
        "",
        "## Method",
        "",
        f"- importance `{imp['name']}`{form}, ranked over the whole model under one width per layer (the "
        "shape a stock config describes)",
        f"- removed: {'layers ' + str(removed['layers']) if removed['layers'] else 'no layers'}, "
        f"{removed['channels_per_layer']} MLP "
        f"channels and {removed['query_heads_per_layer']} query heads ({removed['kv_heads_per_layer']} key/value "
        "heads) per layer",
        f"- compensation: {refit}"
        + ("; the removed units' mean output added as a bias" if comp["mean_bias"] else ""),
    ]
    if cal.get("tokens"):
        lines.append(f"- calibration: {cal['blocks']} blocks of {cal['seq_len']} tokens ({cal['tokens']:,} tokens) "
                     f"of `{data}` (split `{dataset['split']}`), seed {report.get('seed', settings.get('seed'))}")  # fmt: skip
    lines += outcome_lines(report, data)
    lines += usage_lines(settings, model_id)
    lines += ["## What removing units buys", "", STRUCTURED_PARAGRAPH, "",
              "`pruning_report.json` has the units removed per layer, the refit errors, versions and timings."]  # fmt: skip
    return "\n".join(lines) + "\n"
