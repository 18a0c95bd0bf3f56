"""The family fixtures themselves (tests/families.py) are right before any pruning test leans on them.

Each tiny model builds, trains one step's forward and backward, round-trips through save_pretrained and
stock from_pretrained, and generates. Its hand-written target list names real matrices and, with the
routers and the listed non-matrices, covers every 2-D/3-D parameter of the decoder blocks exactly.
"""

from __future__ import annotations

import pytest
import torch

from .families import BY_NAME, FAMILIES, KINDS, decoder_matrices, expert_slot, param_of

SEQ = 32  # longer than every sliding window / attention chunk (8), so mixed layer types really differ


def _ids(model, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (n, SEQ), generator=g)


def _check_targets(family, model) -> None:
    kinds = family.kinds(model)
    assert set(kinds.values()) <= set(KINDS)
    for name in kinds:
        w = family.matrix(model, name)
        assert w.dim() == 2, name
        assert w.shape[1] % 4 == 0, f"{name} {tuple(w.shape)}: input dim does not fit 2:4"
        slot = expert_slot(name)
        if slot:
            stored = model.get_parameter(slot[0])
            assert stored.dim() == 3 and slot[1] < stored.shape[0], name
            assert w.data_ptr() >= stored.data_ptr()  # a view of the stored expert slice, not a copy
        else:
            assert not isinstance(model.get_submodule(name), torch.nn.Embedding), name
    routers = family.routers(model)
    assert not set(routers) & set(kinds)
    assert all(model.get_submodule(r).weight.dim() == 2 for r in routers)


def _check_coverage(family, model) -> None:
    """Targets + routers + listed non-matrices are exactly the decoder's >=2-D parameters, by name and size."""
    matrices = decoder_matrices(model, family)
    targets = family.expected_targets(model)
    routers = [f"{r}.weight" for r in family.routers(model)]
    excluded = family.excluded_params(model)
    assert {param_of(t) for t in targets} | set(routers) | set(excluded) == set(matrices)
    sizes = sum(family.matrix(model, t).numel() for t in targets)
    sizes += sum(matrices[p].numel() for p in [*routers, *excluded])
    assert sizes == sum(p.numel() for p in matrices.values())


def _check_forward_backward(family, model) -> None:
    ids = _ids(model)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for t in family.expected_targets(model):
        grad = model.get_parameter(param_of(t)).grad
        assert grad is not None and torch.isfinite(grad).all(), t
    model.zero_grad(set_to_none=True)


def _check_eager_experts_match(model) -> None:
    """Per-expert hooks need the eager loop; it must compute what the default grouped_mm computes."""
    if model.config._experts_implementation != "grouped_mm":
        return
    ids = _ids(model)
    with torch.no_grad():
        grouped = model(input_ids=ids).logits
        model.set_experts_implementation("eager")
        try:
            torch.testing.assert_close(model(input_ids=ids).logits, grouped)
        finally:
            model.set_experts_implementation("grouped_mm")


def _check_round_trip(model, path) -> None:
    from transformers import AutoModelForCausalLM

    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    ids = _ids(model, n=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    out = loaded.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_builds_trains_saves_and_generates(family, tmp_path):
    model = family.build()
    assert next(model.parameters()).dtype == torch.float32
    _check_targets(family, model)
    _check_coverage(family, model)
    _check_forward_backward(family, model)
    _check_eager_experts_match(model)
    _check_round_trip(model, tmp_path)


def test_build_is_deterministic():
    a, b = BY_NAME["mixtral"].build(), BY_NAME["mixtral"].build()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_mixed_layer_types_really_differ():
    """The layer-wise replay check needs blocks that are called differently within SEQ tokens."""
    for name in ("gemma2", "gemma3", "gpt_oss"):
        c = BY_NAME[name].build().config
        assert set(c.layer_types) == {"sliding_attention", "full_attention"} and c.sliding_window < SEQ, name
    rope = BY_NAME["gemma3"].build().config.rope_parameters
    assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]
    llama4 = BY_NAME["llama4"].build().config
    assert (
        set(llama4.layer_types) == {"chunked_attention", "full_attention"}
        and llama4.attention_chunk_size < SEQ
    )
    for name, kind in (("qwen3_next", "linear_attention"), ("granitemoehybrid", "linear_attention")):
        assert kind in BY_NAME[name].build().config.layer_types, name


def test_tied_and_untied_llama():
    tied, untied = BY_NAME["llama_tied"].build(), BY_NAME["llama_untied"].build()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_moe_families_have_dense_and_sparse_blocks_where_cheap():
    for name in ("deepseek_v3", "llama4"):
        fam = BY_NAME[name]
        kinds = fam.kinds(fam.build())
        for i in (0, 1):
            in_block = {k for n, k in kinds.items() if n.startswith(f"{fam.blocks}.{i}.")}
            assert ("experts" in in_block) == (i == 1), (name, i)
