"""The support table's cases, shared by tests/test_support.py and its two-process worker.

For every (path, option) pair the table allows, one CLI run on a tiny model folder: the option's
example settings on top of the path's own. `shown(option, report)` is the evidence, read from the
report, that the option was really applied.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llm_gradprune.support import OPTIONS, PATHS, applies

# what puts a run on each path (the multi-process ones are launched with two processes)
PATH_SETTINGS = {
    "whole_model": {},
    "whole_model_multi": {},
    "layer_wise": {"reconstruct": "obs"},
    "layer_wise_multi": {"reconstruct": "obs"},
    "sharded": {"fsdp": True},
    "layer_wise_sharded": {"fsdp": True, "reconstruct": "obs", "offload": "disk"},
}
# fisher: the cheapest gradient criterion that every path supports (an option's example may replace it)
BASE = {
    "criterion": "fisher",
    "threads": 1,
    "num_samples": 4,
    "seq_len": 16,
    "batch_size": 1,
    "progress": False,
}


def write_tiny_task(folder: Path) -> Path:
    """A 4-question multiple-choice lm-eval task over the tiny word vocabulary (tests/tiny_folder.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"q": f"w{i} w{i + 1}", "c": [f"w{i + 2}", f"w{i + 9}"], "y": 0} for i in range(4)]
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\n'
        "doc_to_target: y\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n"
    )
    return folder


def settings(option, path: str, tmp: str) -> dict:
    values = {**BASE, **PATH_SETTINGS[path]}
    for key, value in option.example.items():
        if value == "{tasks}":
            value = str(write_tiny_task(Path(tmp) / "tasks"))
        values[key] = value.format(tmp=tmp) if isinstance(value, str) else value
    return values


def cases(paths: list[str]) -> list[tuple[str, str]]:
    """(path, option name) pairs where the option can meet the path at all."""
    out = []
    for path in paths:
        for option in OPTIONS:
            if not applies(option, path):
                continue
            if option.name == "fsdp" and path in ("whole_model_multi", "layer_wise_multi"):
                continue  # fsdp with several processes *is* the sharded path
            out.append((path, option.name))
    return out


def option(name: str):
    return next(o for o in OPTIONS if o.name == name)


def shown(name: str, report: dict) -> bool:
    """The report's evidence that the option was applied."""
    cal, mode = report["calibration"], report["mode"]
    checks = {
        "layer-wise mode": lambda: (
            mode["executor"] == "layer_wise" and all("obs_loss" in t for t in report["per_tensor"].values())
        ),
        "per-token gradient statistics (token_fisher)": lambda: "token_grad_sq_sum" in cal["statistics"],
        "scores that read whole columns (ria)": lambda: (
            report["criterion"] == "ria" and "act_sq_sum" in cal["statistics"]
        ),
        "scope global with activation scores": lambda: (
            report["scope"] == "global" and any("not comparable across layers" in n for n in report["notes"])
        ),
        "allocation owl": lambda: (
            report["allocation_method"] == "owl"
            and len({round(v["sparsity"], 6) for v in report["allocation"].values()}) > 1
        ),
        "grad_accum > 1": lambda: (
            cal["grad_accum"] == 2 and cal["gradients"] == math.ceil(cal["batches"] / 2)
        ),
        "stats_device cpu": lambda: cal["stats_device"] == "cpu" and cal["gradients"] == cal["batches"],
        "gradient_checkpointing": lambda: cal["recomputed_layers"] == 2,
        "scores_dir": lambda: mode["scores_on_disk"] and report["scope"] == "global",
        "pattern N:M": lambda: (
            all(t["nm_groups_valid"] for t in report["per_tensor"].values())
            and report["zero_weights"] == report["target_weights"] // 2
        ),
        "save_state_every / resume": lambda: cal["state_saves"] >= 1,
        "fsdp": lambda: cal["sharding"] == "fsdp2" and cal["processes"] == 2,
        "pruning in rounds": lambda: (
            report["rounds"]["count"] == 2
            and report["rounds"]["per_round"][0]["overall_sparsity"] < report["overall_sparsity"]
        ),
        "recovery training": lambda: (
            report["recovery"]["steps"] == 2 and report["recovery"]["pruned_kept_zero"]
        ),
        "eval tasks (lm-eval)": lambda: (
            report["eval_tasks"]["pruned"]["tiny_mc"]["samples"] == 4
            and "acc" in report["eval_tasks"]["dense"]["tiny_mc"]
        ),
        "eval (perplexity before and after)": lambda: (
            report["eval"]["windows"] == 2 and report["eval"]["pruned_ppl"] > report["eval"]["dense_ppl"] > 1
        ),
    }
    return checks[name]()


__all__ = ["PATHS", "cases", "option", "settings", "shown"]
