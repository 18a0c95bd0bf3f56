"""The model card (README.md) written into every output: front matter the Hub reads, and a body a user can
trust: what was done, with which data, what it measured, how to load it and how to repeat it.

Names are ones a user can read: the base model's Hub id (a built-in's upstream id) or a local folder's
own name, never a local absolute path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..report import BaseModel, Dataset, Report, TensorCount, as_report
from ..scoring.criteria import CRITERIA
from .coverage import coverage_lines, pruned_sentence
from .local_paths import readable_name as _readable
from .plots import layer_projection_table

ZEROS_PARAGRAPH = (
    "The zeros are stored densely: this checkpoint has the dense model's size and runs at its speed in plain "
    "PyTorch/transformers. They pay off only with a sparse kernel or a compressor. 2:4 is the one pattern with "
    "broad hardware support (NVIDIA Ampere and newer, e.g. through `torch.sparse.to_sparse_semi_structured`, "
    "about 1.5-2x on the matmuls)."
)
LOCAL_KEYS = ("output_dir", "state_dir", "scores_dir")


def readable_config(settings: dict[str, Any]) -> dict[str, Any]:
    """The run's settings with names a user can read (base model id, file and folder names)."""
    flat = dict(settings)
    for key in ("model", "dataset", *LOCAL_KEYS):  # built-ins and Hub ids stay as they are
        if key in flat:
            flat[key] = _readable(flat[key])
    return flat


def front_matter(report: Report | dict[str, Any]) -> dict[str, Any]:
    r = as_report(report)
    base = r.base_model or BaseModel()
    meta: dict[str, Any] = {}
    if base.hub_id:
        meta["base_model"] = base.hub_id
    if base.license:
        meta["license"] = base.license
    if r.calibration_dataset:
        meta["datasets"] = [r.calibration_dataset]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    if r.structured:
        shrunk = r.shrinking
        tags = ["pruned", "structured-pruning", "llm-gradprune", shrunk.structure, shrunk.importance.name]
    else:
        tags = ["pruned", "sparse", "llm-gradprune", r.sparsity.pattern, r.sparsity.criterion]
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def _base(r: Report, settings: dict[str, Any]) -> BaseModel:
    """The base model's readable names; a library call's report lacks them: the settings' model."""
    return r.base_model or BaseModel(name=_readable(settings.get("model")))


def _dataset(r: Report, settings: dict[str, Any]) -> Dataset:
    return r.dataset or Dataset(name=settings.get("dataset"), split=settings.get("split"))


def _seed(r: Report, settings: dict[str, Any]) -> Any:
    return r.seed if r.seed is not None else settings.get("seed")


def _plot_files(r: Report) -> list[str]:
    return r.plots.files if r.plots else []


def sparsity_table(per_tensor: dict[str, TensorCount]) -> list[str]:
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


def _heading(r: Report, title: str) -> list[str]:
    """The front matter the Hub reads, then the title."""
    return ["---", yaml.safe_dump(front_matter(r), sort_keys=False).strip(), "---", f"# {title}", ""]


def model_card(settings: dict[str, Any], report: Report | dict[str, Any], model_id: str | None = None) -> str:
    """README.md for the output folder. `settings`: the run's flat settings (what prune_config.yaml
    holds); a library call's report lacks the job's keys (model, data set, seed), they come from there.
    `model_id`: what the loading snippet loads (the Hub repo when pushed; by default the output folder's
    own name, loadable from the folder above it)."""
    r = as_report(report)
    if r.structured:
        return structured_card(settings, r, model_id)
    sp, cal = r.sparsity, r.calibration
    crit = CRITERIA.get(sp.criterion)
    base = _base(r, settings)
    model_id = model_id or Path(settings.get("output_dir") or "pruned").name
    kind = f"{sp.pattern} sparse" if sp.pattern != "unstructured" else f"{sp.overall_sparsity:.0%} sparse"
    params = ", ".join(f"{k}={v}" for k, v in sp.criterion_params.items())
    dataset = _dataset(r, settings)
    data = _readable(dataset.name)
    lines = [
        *_heading(r, f"{base.name}, {kind} ({sp.criterion})"),
        f"`{base.hub_id or base.name}` pruned by [llm-gradprune](https://pypi.org/project/llm-gradprune/): "
        + pruned_sentence(sp),
        "",
        *coverage_lines(sp),
        "## Method",
        "",
        f"- criterion `{sp.criterion}`: {crit.help}; score {crit.formula}"
        + (f" ({params})" if params else ""),
        f"- target sparsity {sp.target_sparsity:g}, scope `{sp.scope}`, pattern `{sp.pattern}`, "
        f"allocation `{sp.allocation_method}`",
        f"- weight update `{sp.mode.reconstruct}` ({sp.mode.executor.replace('_', '-')} executor)",
        f"- calibration: {cal.batches} micro-batches of {_known(cal.batch_size)} x {_known(cal.seq_len)} "
        f"tokens ({cal.tokens:,} tokens) of `{data}` (split `{dataset.split}`), seed {_seed(r, settings)}",
        "",
        "## Sparsity per layer and projection",
        "",
        *sparsity_table(sp.per_tensor),
    ]
    if "sparsity.png" in _plot_files(r):
        lines += ["", "![sparsity per layer and projection](sparsity.png)"]
    lines += outcome_lines(r, data)
    lines += usage_lines(settings, model_id)
    lines += [
        "## What the zeros buy",
        "",
        ZEROS_PARAGRAPH,
        "",
        "`pruning_report.json` has the per-tensor counts, the calibration's token hash, versions and timings.",
    ]
    return "\n".join(lines) + "\n"


def _known(value: Any) -> Any:
    """A calibration size as the card shows it: '?' when the run did not record it (a library call)."""
    return "?" if value is None else value


def outcome_lines(report: Report | dict[str, Any], data: str) -> list[str]:
    """Recovery, held-out perplexity, task scores and skipped plots: the same in every card."""
    r = as_report(report)
    lines = recovery_lines(r) + eval_lines(r, data) + task_lines(r)
    if r.plots and r.plots.skipped:
        lines += ["", f"(Plots skipped: {r.plots.skipped}.)"]
    return lines


def recovery_lines(r: Report) -> list[str]:
    rec = r.recovery
    if not rec:
        return []
    kind = f"LoRA rank {rec.lora_r} merged through the mask" if rec.lora_r else "the target weights"
    loss = f"{rec.distill_alpha:g} x KL(teacher || student) + {1 - rec.distill_alpha:g} x next-token loss" \
        if rec.distill_alpha else "next-token loss"  # fmt: skip
    lines = ["", "## Recovery training", "",
             f"After pruning, {rec.steps} AdamW steps ({rec.tokens:,} tokens, lr {rec.lr:g}, "
             f"{rec.schedule}) trained {kind} on {loss}"
             + (f" from `{_readable(rec.teacher)}`" if rec.teacher else "")
             + f", text `{_readable(rec.data.name)}` split `{rec.data.split}`. "
             + ("The removed units are gone from the shapes; the weights that were exactly zero stayed zero."
                if r.structured else
                "Every pruned weight stayed exactly zero (gradients masked, masks re-applied after each step).")]  # fmt: skip
    if "recovery_loss.png" in _plot_files(r):
        lines += ["", "![recovery loss](recovery_loss.png)"]
    return lines


def eval_lines(r: Report, data: str) -> list[str]:
    ev = r.eval
    if not ev:
        return []
    lines = ["", "## Held-out perplexity", "", "| model | perplexity |", "|---|---|"]
    if ev.dense_ppl is not None:
        lines.append(f"| dense | {ev.dense_ppl:.2f} |")
    lines.append(f"| pruned | {ev.pruned_ppl:.2f} |")
    if ev.recovered_ppl is not None:
        lines.append(f"| pruned + recovery | {ev.recovered_ppl:.2f} |")
    lines += ["", f"{ev.windows} windows of {ev.seq_len} tokens ({ev.tokens:,} scored tokens) of "
              f"`{data}` split `{ev.split}`, never seen in calibration."]  # fmt: skip
    if "perplexity.png" in _plot_files(r):
        lines += ["", "![held-out perplexity](perplexity.png)"]
    return lines


def task_lines(r: Report) -> list[str]:
    tasks = r.eval_tasks
    if not tasks:
        return []
    lines = [
        "",
        "## Task scores (lm-evaluation-harness)",
        "",
        "| task | metric | dense | pruned |",
        "|---|---|---|---|",
    ]
    for task, metrics in tasks.pruned.items():
        for metric, value in metrics.items():
            if metric in ("samples",) or metric.endswith("_stderr"):
                continue
            dense = (tasks.dense or {}).get(task, {}).get(metric)
            lines.append(f"| {task} | {metric} | {dense:.4f} | {value:.4f} |" if dense is not None
                         else f"| {task} | {metric} | - | {value:.4f} |")  # fmt: skip
    lines += ["", f"lm-eval {tasks.lm_eval_version}, {tasks.num_fewshot} shots; `acc` is the accuracy of the "
              "highest log-likelihood choice, `acc_norm` the same with the log-likelihood divided by the "
              "choice's length in bytes."]  # fmt: skip
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


def structured_card(
    settings: dict[str, Any], report: Report | dict[str, Any], model_id: str | None = None
) -> str:
    """README.md of a structured run's output: the new shape, parameters and file size before and after."""
    r = as_report(report)
    shrunk, cal = r.shrinking, r.calibration
    base = _base(r, settings)
    model_id = model_id or Path(settings.get("output_dir") or "pruned").name
    imp, comp = shrunk.importance, shrunk.compensation
    before, after = shrunk.params_before, shrunk.params_after
    dataset = _dataset(r, settings)
    data = _readable(dataset.name)
    form = f" ({imp.form} form)" if imp.form else ""
    refit = ("none (sliced only)" if comp.compensate == "none" else
             f"least-squares refit of down_proj / o_proj on {comp.refit_inputs} calibration inputs")  # fmt: skip
    if shrunk.structure == "experts":
        refit = "none needed: whole experts go, and no kept weight reads their outputs"
    units = {"mixed": "channels, heads and layers", "experts": "routed experts"}.get(
        shrunk.structure, shrunk.structure
    )
    lines = [
        *_heading(
            r, f"{base.name}, {shrunk.decoder_kept:.0%} of the decoder ({shrunk.structure}, {imp.name})"
        ),
        f"`{base.hub_id or base.name}` made smaller by [llm-gradprune](https://pypi.org/project/llm-gradprune/) "
        f"structured pruning: whole {units} "
        f"removed, keeping {after.decoder:,} of {before.decoder:,} decoder parameters "
        f"({shrunk.decoder_kept:.1%}); {after.total:,} parameters in all (was {before.total:,}).",
        "",
        *shape_table(r),
    ]
    if "shape.png" in _plot_files(r):
        lines += ["", "![kept share of each kind of unit](shape.png)"]
    removed = shrunk.removed
    lines += [
        "",
        "## Method",
        "",
        f"- importance `{imp.name}`{form}, ranked over the whole model under one width per layer (the "
        "shape a stock config describes)",
        f"- removed: {removed_text(removed)}",
        f"- compensation: {refit}"
        + ("; the removed units' mean output added as a bias" if comp.mean_bias else ""),
    ]
    if cal.tokens:
        lines.append(f"- calibration: {cal.samples} samples of {cal.seq_len} tokens ({cal.tokens:,} tokens) "
                     f"of `{data}` (split `{dataset.split}`), seed {_seed(r, settings)}")  # fmt: skip
    lines += outcome_lines(r, data)
    lines += usage_lines(settings, model_id)
    lines += ["## What removing units buys", "", STRUCTURED_PARAGRAPH, "",
              "`pruning_report.json` has the units removed per layer, the refit errors, versions and timings."]  # fmt: skip
    return "\n".join(lines) + "\n"


def removed_text(removed) -> str:
    """What a structured run removed, per layer, in words: layers, channels of each MLP width, heads, experts."""
    groups = removed.channels_per_group or {"intermediate_size": removed.channels_per_layer}
    per = [f"{n} channels of each MLP of width `{g}`" for g, n in groups.items() if n]
    if removed.query_heads_per_layer:
        per.append(
            f"{removed.query_heads_per_layer} query heads ({removed.kv_heads_per_layer} key/value heads)"
        )
    if removed.experts_per_layer:
        per.append(f"{removed.experts_per_layer} routed experts (with their router rows)")
    layers = "layers " + str(removed.layers) if removed.layers else "no layers"
    return layers + ("; per layer " + ", ".join(per) if per else "")


def shape_table(r: Report) -> list[str]:
    """The shape, parameters and file bytes before and after a structured run."""
    shrunk = r.shrinking
    lines = ["## Shape", "", "| | before | after |", "|---|---|---|"]
    for key, label, value in shrunk.shape_before.rows():
        lines.append(f"| {label} (`{key}`) | {value} | {getattr(shrunk.shape_after, key)} |")
    lines.append(f"| parameters | {shrunk.params_before.total:,} | {shrunk.params_after.total:,} |")
    if shrunk.file_bytes_before and r.file_bytes:
        lines.append(f"| safetensors bytes | {shrunk.file_bytes_before:,} | {r.file_bytes:,} |")
    elif r.file_bytes:
        lines.append(f"| safetensors bytes | - | {r.file_bytes:,} |")
    return lines
