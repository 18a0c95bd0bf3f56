"""lm-eval bridge: `eval --tasks` on a tiny local multiple-choice task (JSONL rows and a task YAML written
here, so it runs offline and in CI) returns the accuracy worked out by hand from the model's own
log-likelihoods; `prune --eval-tasks` records the scores before and after pruning in the report and card."""

from __future__ import annotations

import json

import pytest
import torch

from llm_gradprune import commands as cli

from .tiny_folder import WORDS, make_model_folder, make_text_file

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"{WORDS[i]} {WORDS[i + 1]}", "choices": [WORDS[i + 2], WORDS[i + 40], WORDS[i + 80]],
             "label": i % 3} for i in range(12)]  # fmt: skip
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'rows.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n  - metric: acc_norm\n    higher_is_better: true\n"
    )
    return {"model": make_model_folder(root / "model", seed=3), "text": make_text_file(root / "t.txt"),
            "tasks": root / "tasks", "rows": rows}  # fmt: skip


def hand_accuracy(model_dir, rows) -> float:
    """acc by hand: the choice whose continuation " choice" has the highest summed log-likelihood."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = (
        AutoModelForCausalLM.from_pretrained(model_dir).eval(),
        AutoTokenizer.from_pretrained(model_dir),
    )
    right = 0
    for r in rows:
        ctx = tok(r["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in r["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(input_ids=ids).logits.log_softmax(-1)[0]
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += int(max(range(3), key=lambda i: scores[i]) == r["label"])
    return right / len(rows)


def test_eval_tasks_returns_the_hand_computed_accuracy(assets, capsys):
    argv = [
        "eval",
        str(assets["model"]),
        "--tasks",
        "tiny_mc",
        "--include-path",
        str(assets["tasks"]),
        "--json",
    ]
    assert cli.main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = got["tasks"]["tiny_mc"]
    assert scores["samples"] == 12 and got["lm_eval_version"] and got["num_fewshot"] == 0
    assert scores["acc"] == pytest.approx(hand_accuracy(assets["model"], assets["rows"]))
    assert 0.0 <= scores["acc_norm"] <= 1.0


def test_prune_records_task_scores_before_and_after(assets, tmp_path):
    out = tmp_path / "out"
    argv = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--num-samples", "4",
            "--seq-len", "16", "--criterion", "magnitude", "--sparsity", "0.9", "--eval-tasks", "tiny_mc",
            "--eval-tasks-include-path", str(assets["tasks"]), "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    tasks = report["eval_tasks"]
    assert tasks["dense"]["tiny_mc"]["acc"] == pytest.approx(hand_accuracy(assets["model"], assets["rows"]))
    assert tasks["pruned"]["tiny_mc"]["acc"] == pytest.approx(hand_accuracy(out, assets["rows"]))
    card = (out / "README.md").read_text()
    assert (
        f"| tiny_mc | acc | {tasks['dense']['tiny_mc']['acc']:.4f} | {tasks['pruned']['tiny_mc']['acc']:.4f} |"
        in card
    )
    assert f"lm-eval {tasks['lm_eval_version']}" in card


def test_unknown_task_is_one_line_before_any_work(assets, tmp_path, capsys):
    argv = ["prune", "--model", str(assets["model"]), "--dataset", str(assets["text"]), "--eval-tasks", "no_such",
            "--eval-tasks-include-path", str(assets["tasks"]), "--output-dir", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval task 'no_such' is unknown to lm-eval in" in err
    assert not (tmp_path / "o").exists()
