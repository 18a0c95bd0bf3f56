"""The card, the sparsity table and the `prune` summary say what was pruned and what was not: matrices and
weights per kind, the experts and the tokens routed to them, the routers untouched. Reports come from real
runs on tiny random MoE and GPT-2 models; a report written before the kinds were recorded still renders."""

from __future__ import annotations

import copy

import pytest
import torch

import llm_gradprune
from llm_gradprune import PruneConfig
from llm_gradprune.commands.prune import outcome_line
from llm_gradprune.io.card import model_card, sparsity_table
from llm_gradprune.io.checkpoint import save_pruned
from llm_gradprune.io.coverage import short_names
from llm_gradprune.io.plots import layer_projection_table
from llm_gradprune.report import Report, TensorCount

from .families import BY_NAME

FAMILIES = ("mixtral", "qwen2_moe", "gpt2")


@pytest.fixture(scope="module")
def runs():
    """{family: (pruned model, its report)}."""
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = BY_NAME[name].build()
        batches = list(torch.randint(0, 128, (4, 32)).split(2))
        out[name] = model, llm_gradprune.prune_(model, batches, PruneConfig(progress=False)).report
    return out


@pytest.fixture(scope="module")
def reports(runs):
    return {name: report for name, (_, report) in runs.items()}


def card(report) -> str:
    return model_card({"output_dir": "out"}, copy.deepcopy(report))


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_mixtral_card_counts_attention_and_experts_and_names_the_routers(reports):
    r = reports["mixtral"]
    body = card(r)
    assert "every Linear" not in body
    assert "(55,296 weights: the attention and routed-expert matrices) are exactly zero" in body
    assert "Routers, embeddings, norms and the language-model head are untouched" in body
    pruned = section(body, "What was pruned")
    assert "| attention | 8 | 6,144 |\n| routed experts | 16 | 49,152 |\n| all | 24 | 55,296 |" in pruned
    assert "- Experts: 8 experts in 2 MoE layers" in pruned
    assert "`model.layers.0.mlp.experts.0.gate_up_proj`" in pruned
    counts = sorted(r["experts"]["routed_tokens"].values())
    assert f"min {counts[0]}, median {(counts[3] + counts[4]) / 2:g}, max {counts[-1]}." in pruned
    assert "Every expert received calibration tokens." in pruned
    assert ("Untouched: 2 routers (`model.layers.0.mlp.gate.weight`, `model.layers.1.mlp.gate.weight`), "
            "never pruned: a router chooses or weighs the experts") in pruned  # fmt: skip
    assert "1 other matrix (4,096 weights)" in pruned  # the untied head


def test_qwen2_moe_card_tells_shared_experts_and_both_gates_apart(reports):
    body = card(reports["qwen2_moe"])
    assert "the attention, routed-expert and shared-expert matrices" in body
    pruned = section(body, "What was pruned")
    assert (
        "| routed experts | 16 | 24,576 |\n| shared experts | 6 | 12,288 |\n| all | 30 | 43,008 |" in pruned
    )
    # four routers fold into a pattern per name: the 1xH shared_expert_gate is one of them, never pruned
    assert ("4 routers (`model.layers.*.mlp.gate.weight` x 2, `model.layers.*.mlp.shared_expert_gate.weight` "
            "x 2)") in pruned  # fmt: skip
    assert not any("shared_expert_gate" in n for n in reports["qwen2_moe"]["per_tensor"])


def test_gpt2_card_has_no_router_and_no_expert_and_splits_its_two_c_proj(reports):
    body = card(reports["gpt2"])
    assert "(16,384 weights: the attention and MLP matrices)" in body
    assert "| attention | 4 | 8,192 |\n| MLP | 4 | 8,192 |" in body
    assert "router" not in body.lower() and "Experts:" not in body
    table = section(body, "Sparsity per layer and projection")
    assert "| layer | attn.c_attn | attn.c_proj | mlp.c_fc | mlp.c_proj |" in table
    assert "| 1 | 50.0% | 50.0% | 50.0% | 50.0% |" in table


def test_an_unrouted_expert_is_named_with_the_rule(reports):
    r = copy.deepcopy(reports["mixtral"])
    names = list(r["experts"]["routed_tokens"])
    r["experts"]["routed_tokens"][names[1]] = 0
    r["experts"]["unrouted"] = [names[1]]
    pruned = section(card(r), "What was pruned")
    assert f"- 1 expert received no calibration token (`{names[1]}`): {r['experts']['rule']}." in pruned
    assert "Every expert" not in pruned and "min 0," in pruned
    r["experts"]["unrouted"] = names
    assert f"`{names[2]}` and 5 more)" in section(card(r), "What was pruned")


def test_a_report_without_kinds_still_renders(reports):
    r = copy.deepcopy(reports["mixtral"])
    del r["matrices"], r["experts"]
    body = card(r)
    assert "(55,296 weights: the matrices of the decoder layers) are exactly zero. Embeddings, norms" in body
    assert "## What was pruned" not in body
    assert outcome_line(Report.from_dict(r)).endswith("pattern unstructured)")


def test_the_summary_line_counts_kinds_experts_and_routers(reports):
    line = outcome_line(Report.from_dict(reports["mixtral"]))
    assert line.endswith("pattern unstructured); attention 8, routed experts 16 (8 experts in 2 MoE layers); "
                         "2 routers untouched")  # fmt: skip
    line = outcome_line(Report.from_dict(reports["qwen2_moe"]))
    assert line.endswith("(8 experts in 2 MoE layers), shared experts 6; 4 routers untouched")
    assert outcome_line(Report.from_dict(reports["gpt2"])).endswith("; attention 4, MLP 4")


def test_the_table_groups_each_expert_matrix_name_into_one_column(reports):
    per_tensor = Report.from_dict(reports["qwen2_moe"]).sparsity.per_tensor
    layers, projections, cells = layer_projection_table(per_tensor)
    assert layers == ["0", "1"]
    assert projections == ["q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj",
                           "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]  # fmt: skip
    # the zeros and weights of the experts are summed, not the last expert's share kept
    counts = {"model.layers.0.mlp.experts.0.down_proj": TensorCount(numel=8, zeros=8, masked=8),
              "model.layers.0.mlp.experts.1.down_proj": TensorCount(numel=24, zeros=0, masked=0),
              "model.layers.0.block_sparse_moe.experts.2.w1.weight": TensorCount(numel=4, zeros=1, masked=1)}  # fmt: skip
    _, projections, cells = layer_projection_table(counts)
    assert projections == ["experts.down_proj", "experts.w1"]  # an older layout's nn.Linear experts too
    assert cells["0", "experts.down_proj"] == 0.25 and cells["0", "experts.w1"] == 0.25


def test_the_dense_table_is_unchanged():
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    per_tensor = {f"model.layers.{i}.{n}.weight": TensorCount(numel=16, zeros=4 * (i + 1), masked=0)
                  for i in range(2) for n in names}  # fmt: skip
    assert sparsity_table(per_tensor) == [
        "| layer | q_proj | o_proj | gate_proj | down_proj |",
        "|---|---|---|---|---|",
        "| 0 | 25.0% | 25.0% | 25.0% | 25.0% |",
        "| 1 | 50.0% | 50.0% | 50.0% | 50.0% |",
    ]


def test_many_names_fold_into_patterns():
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(48)]
    assert short_names(routers) == "`model.layers.*.mlp.gate.weight` x 48"
    assert short_names(routers[:2]) == "`model.layers.0.mlp.gate.weight`, `model.layers.1.mlp.gate.weight`"


def test_the_saved_card_of_a_moe_run(runs, tmp_path):
    """Through save_pruned: the card written beside the weights says what was pruned."""
    model, report = runs["mixtral"]
    out = save_pruned(model, None, copy.deepcopy(report), tmp_path / "mixtral-pruned",
                      settings={"criterion": "token_fisher"})  # fmt: skip
    body = (out / "README.md").read_text()
    assert "| routed experts | 16 | 49,152 |" in body and "2 routers (" in body
    assert "| experts.gate_up_proj | experts.down_proj |" in body
