"""The family matrix (issue 22): every family users prune, pruned by the three paths that matter, on
tiny random models built in code (tests/families.py holds the hand-written expectations).

For each family: the targets equal the hand-written list (one name per expert matrix, routers never),
and whole-model token_fisher per row, layer-wise sparsegpt and wanda 2:4 each give every target matrix
its exact sparsity, change nothing else, verify and load with stock `from_pretrained`, and generate.
Layer-wise wanda on dense inputs (reconstruct obs, sequential off) picks the whole-model wanda masks:
each block replayed with its own call (Gemma's sliding and global layers, gpt-oss's) changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.errors import ConfigError
from llm_gradprune.io.checkpoint import save_pruned
from llm_gradprune.targets import find_targets

from .families import FAMILIES, MOVING_2OF4, STRUCTURED, param_of

pytestmark = pytest.mark.slow

SUPPORTED = list(FAMILIES)  # every family here is supported; a layout that is not is refused (test_experts)
PATHS = {
    "token_fisher/row": {"criterion": "token_fisher", "scope": "row"},
    # block-local per-token curvature: a backward through each block alone, experts included
    "block_fisher/row": {"criterion": "block_fisher", "scope": "row"},
    "sparsegpt": {"criterion": "sparsegpt"},
    "wanda/2:4": {"criterion": "wanda", "pattern": "2:4"},
    # the recipes' block refit (a step per micro-batch): every pruned weight still 0, 2:4 still 2:4
    "wanda/2:4+block": {
        "criterion": "wanda",
        "pattern": "2:4",
        "block_steps": 2,
        "block_lr": 1e-3,
        "block_batch": 1,
    },
    # masks that move inside the refit: still 2:4, still exactly half, experts and Conv1D included
    "wanda/2:4+dynamic": MOVING_2OF4,
}


def _batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randint(0, vocab, (4, 32), generator=g).split(2))


def _masks(model, family) -> dict[str, torch.Tensor]:
    return {n: family.matrix(model, n) == 0 for n in family.expected_targets(model)}


def _untouched(before: dict[str, torch.Tensor], model, family) -> None:
    """Every parameter that holds no target is bit-identical; targets' parameters keep their shape."""
    holders = {param_of(n) for n in family.expected_targets(model)}
    for name, p in model.named_parameters():
        if name not in holders:
            assert torch.equal(p, before[name]), f"{name} changed but is not a target"


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_targets_are_every_matrix_and_never_a_router(family):
    model = family.build()
    targets = find_targets(model)
    assert sorted(targets) == family.expected_targets(model)
    kinds = family.kinds(model)
    assert {n: t.kind for n, t in targets.items()} == kinds
    from llm_gradprune.targets import all_matrices

    routers = [r.removesuffix(".weight") for r in all_matrices(model)[1]]
    assert sorted(routers) == family.routers(model)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_every_family_pruned_exactly_and_loads(family, path, tmp_path):
    model = family.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune_(model, _batches(model.config.vocab_size), PruneConfig(progress=False, **PATHS[path]))
    report = result.report
    assert report["targets"] == len(family.expected_targets(model))
    for name, mask in _masks(model, family).items():
        if path.startswith("wanda/2:4"):
            groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all(), name
        elif path.endswith("/row"):
            assert (mask.sum(1) == mask.shape[1] // 2).all(), name
        else:
            assert int(mask.sum()) == mask.numel() // 2, name
    _untouched(before, model, family)
    if path.endswith(
        ("+block", "+dynamic")
    ):  # every block refit, each with one update per micro-batch and pass
        per_block = report["mode"]["block_refit"]["per_block"]
        assert per_block and all(
            b["updates"] == 2 * len(_batches(model.config.vocab_size)) for b in per_block
        )
    kinds = report["matrices"]["per_kind"]
    assert sum(k["matrices"] for k in kinds.values()) == report["targets"]
    if any(".experts." in n for n in family.expected_targets(model)):
        assert report["experts"]["routed_tokens"] and not report["experts"]["unrouted"]
    out = save_pruned(model, None, report, tmp_path / "out", settings={"model": family.name})
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for name, mask in _masks(loaded, family).items():
        assert torch.equal(mask, family.matrix(model, name) == 0), name
    ids = torch.tensor([[1, 2, 3, 4]])
    assert loaded.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("family", SUPPORTED, ids=lambda f: f.name)
def test_layer_wise_masks_equal_whole_model_masks(family):
    batches = _batches(family.build().config.vocab_size)
    whole, layer = family.build(), family.build()
    prune_(whole, batches, PruneConfig(progress=False, criterion="wanda"))
    r = prune_(
        layer, batches, PruneConfig(progress=False, criterion="wanda", reconstruct="obs", sequential=False)
    )
    assert r.report["mode"]["layer_wise"]
    for name, mask in _masks(whole, family).items():
        assert torch.equal(mask, _masks(layer, family)[name]), name


STRUCTURE_RUNS = {"channels": {"structure": "channels", "target_params": 0.75},
                  "heads": {"structure": "heads", "keep_heads": 0.5},
                  "layers": {"structure": "layers", "keep_layers": 0.5},
                  "experts": {"structure": "experts", "keep_experts": 0.5}}  # fmt: skip
OFFERED = [(f, s) for f in FAMILIES if f.name in STRUCTURED for s in STRUCTURED[f.name]]


@pytest.mark.parametrize("family,structure", OFFERED, ids=lambda v: v if isinstance(v, str) else v.name)
def test_structured_runs_save_load_with_stock_transformers_and_generate(family, structure, tmp_path):
    """Every structure a family offers (default importance, lsq refit on sequential inputs) shrinks the
    shape it names, and the saved folder loads with plain from_pretrained, gives the same logits and
    generates."""
    from llm_gradprune.structured import StructureConfig, find_units, save_structured, shrink_

    model = family.build().eval()
    before = find_units(model).shape.to_dict()
    report = shrink_(model, _batches(model.config.vocab_size), StructureConfig(**STRUCTURE_RUNS[structure]),
                     progress=False)  # fmt: skip
    after = find_units(model).shape.to_dict()
    changed = {k for k in before if before[k] != after[k]}
    want = {"channels": {k for k in before if k.endswith("intermediate_size")}, "layers": {"num_hidden_layers"},
            "heads": {"num_attention_heads", "num_key_value_heads"}, "experts": {find_units(model).shape.experts_key}}  # fmt: skip
    assert changed and changed <= want[structure], (changed, want[structure])
    assert report["params_after"]["decoder"] < report["params_before"]["decoder"]
    save_structured(model, None, tmp_path / "out", report)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert loaded.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name not in STRUCTURED], ids=lambda f: f.name)
def test_structured_pruning_elsewhere_is_refused_in_one_line(family):
    from llm_gradprune.structured import StructureConfig, shrink_

    model = family.build()
    with pytest.raises(ConfigError, match="structured pruning needs") as err:
        shrink_(model, _batches(model.config.vocab_size), StructureConfig(), progress=False)
    assert "\n" not in str(err.value)


def test_the_families_doc_table_is_current():
    from pathlib import Path

    from .families import markdown_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "FAMILIES.md").read_text()
    assert markdown_table() in doc, "regenerate: python -m tests.families --markdown"
