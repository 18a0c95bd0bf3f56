"""lm-evaluation-harness tasks on a model already in memory (the optional `lmeval` extra).

This is how the field compares pruned models (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e/c, OBQA). The
model is loaded the project's way (so `builtin:` names work) and handed to lm-eval's HFLM wrapper;
offline users point `include_path` at a folder of task YAML files. The result records the lm-eval
version and both accuracies lm-eval computes for multiple choice: `acc` (the choice with the highest
log-likelihood) and `acc_norm` (log-likelihood divided by the choice's byte length).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, hub_unreachable, unreachable

INSTALL = "pip install 'llm-gradprune[lmeval]'"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            f"eval tasks need lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    return lm_eval, TaskManager


def check_tasks(tasks: list[str], include_path: str | None = None) -> None:
    """Refuse unknown task names (and a missing lm-eval) before any compute, in one line."""
    if not tasks:
        return
    _, TaskManager = _lm_eval()  # noqa: N806
    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" in {include_path!r}" if include_path else ""
        raise ConfigError(
            f"eval task {unknown[0]!r} is unknown to lm-eval{where} (give --include-path for local tasks)"
        )


def _unreachable_data(tasks: list[str], manager) -> str:
    """One line naming the task whose data set the Hub could not give (tried one by one, now that one
    of them failed) and how to run it offline."""
    failing = tasks[0]
    for task in tasks if len(tasks) > 1 else []:
        try:
            manager.load_task_or_group([task])
        except Exception as err:  # noqa: BLE001 - only which task fails matters here
            if unreachable(err):
                failing = task
                break
    return hub_unreachable("the data set of eval task", failing) + " (--include-path for local task files)"


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """{"lm_eval_version", "num_fewshot", "tasks": {task: {metric: value, ..., "samples": n}}}."""
    lm_eval, TaskManager = _lm_eval()  # noqa: N806
    from lm_eval.models.huggingface import HFLM

    device = device or str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
        manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False, verbosity="ERROR")  # fmt: skip
        except Exception as err:
            if not unreachable(err):
                raise
            raise ConfigError(_unreachable_data(tasks, manager)) from None
    finally:
        model.train(was_training)
    scores: dict[str, dict[str, Any]] = {}
    for task, values in out["results"].items():
        row = {}
        for key, value in values.items():
            if isinstance(value, int | float) and "," in key and not isinstance(value, bool):
                metric, _, _filter = key.partition(",")
                row[metric] = float(value)
        row["samples"] = int(
            out.get("n-samples", {}).get(task, {}).get("effective", values.get("sample_len", 0))
        )
        scores[task] = row
    return {"lm_eval_version": lm_eval.__version__, "num_fewshot": num_fewshot or 0, "tasks": scores}
