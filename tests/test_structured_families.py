"""Structured pruning across families (issue 24): exactness on every family it supports.

- channels and heads, no compensation: the shrunk model's logits equal the dense model's with the
  removed channels' (down_proj columns, in every MLP: dense, each expert, the shared expert) or heads'
  (o_proj columns) outputs zeroed;
- experts: removing experts the router never selects (their router logits forced to -inf in the dense
  model) leaves the logits unchanged, and every expert importance that reads the routing finds them;
- the unit statistics of an MoE layer by hand: routed counts, REAP sums and the expert removal
  gradient against autograd.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llm_gradprune.structured import StructureConfig, find_units, gather_unit_statistics, shrink_

from .families import BY_NAME, STRUCTURED

pytestmark = pytest.mark.slow

WITH = {kind: [BY_NAME[n] for n, kinds in STRUCTURED.items() if kind in kinds] for kind in ("channels", "heads",
                                                                                               "experts")}  # fmt: skip


def _batches(vocab: int, n: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (n, seq), generator=g).split(1))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _removed(kept: list[int], n: int) -> list[int]:
    return [j for j in range(n) if j not in set(kept)]


@pytest.mark.parametrize("family", WITH["channels"], ids=lambda f: f.name)
def test_removed_channels_equal_their_down_columns_zeroed(family):
    dense = family.build().eval()
    model = copy.deepcopy(dense)
    x = _batches(dense.config.vocab_size, seed=2)[0]
    cfg = StructureConfig(structure="channels", keep_channels=0.5, channel_multiple=1, compensate="none")
    report = shrink_(model, _batches(dense.config.vocab_size), cfg, progress=False)
    units = find_units(dense)
    zeroed = 0
    with torch.no_grad():
        for i, removed in report["removed"]["channels"].items():
            per = removed if isinstance(removed, dict) else {units.layers[i].mlps[0].name: removed}
            for m in units.layers[i].mlps:
                assert len(per[m.name]) == m.width - m.width // 2  # every MLP of its group loses as many
                m.down.weight[:, per[m.name]] = 0
                zeroed += len(per[m.name])
    assert zeroed > 0 and len(report["removed"]["channels"]) == dense.config.num_hidden_layers
    assert torch.allclose(_logits(model, x), _logits(dense, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", WITH["heads"], ids=lambda f: f.name)
def test_removed_heads_equal_their_o_columns_zeroed(family):
    dense = family.build().eval()
    model = copy.deepcopy(dense)
    x = _batches(dense.config.vocab_size, seed=2)[0]
    cfg = StructureConfig(structure="heads", keep_heads=0.5, compensate="none")
    report = shrink_(model, _batches(dense.config.vocab_size), cfg, progress=False)
    units = find_units(dense)
    hd, heads = units.shape.head_dim, units.shape.heads
    assert model.config.num_attention_heads == heads // 2
    with torch.no_grad():
        for i, kept in report["removed"]["query_heads_kept"].items():
            for h in _removed(kept, heads):
                units.layers[i].attn["o"].weight[:, h * hd : (h + 1) * hd] = 0
    assert torch.allclose(_logits(model, x), _logits(dense, x), atol=1e-5, rtol=1e-4)


class _RoutersOff(TorchFunctionMode):
    """The dense model whose routers never select `off`: their logits are -inf in every router call."""

    def __init__(self, model, off: list[int]):
        super().__init__()
        units = find_units(model)
        self.ids = {id(lu.block.get_parameter(r)) for lu in units.layers for r in lu.experts.routers
                    if lu.block.get_parameter(r).shape[0] == lu.experts.count}  # fmt: skip
        self.off = off

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self.ids:
            out = out.clone()
            out[..., self.off] = float("-inf")
        return out


@pytest.mark.parametrize("importance", ["frequency", "reap", "token_fisher", "fisher", "taylor"])
@pytest.mark.parametrize("family", WITH["experts"], ids=lambda f: f.name)
def test_removing_experts_the_router_never_selects_leaves_logits_unchanged(family, importance):
    model = family.build().eval()
    x = _batches(model.config.vocab_size, seed=2)[0]
    off = [0, 2]
    with _RoutersOff(model, off):
        ref = _logits(model, x)
        report = shrink_(model, _batches(model.config.vocab_size),
                         StructureConfig(structure="experts", keep_experts=0.5, importance=importance), progress=False)  # fmt: skip
    assert all(kept == [1, 3] for kept in report["removed"]["experts_kept"].values())
    assert (
        report["shape_after"][find_units(model).shape.experts_key] == 2
        and report["removed"]["experts_per_layer"] == 2
    )
    assert torch.allclose(_logits(model, x), ref, atol=1e-5, rtol=1e-4)
    assert report["params_after"]["decoder"] < report["params_before"]["decoder"]


def test_expert_unit_statistics_by_hand():
    """Routed counts, REAP sums and the expert removal gradient of Mixtral's layer 1, against the router's
    top-k, each expert's own output and autograd through a gate on each expert's contribution."""
    model = BY_NAME["mixtral"].build().eval()
    units = find_units(model)
    lu = units.layers[1]
    x = _batches(model.config.vocab_size, n=1, seq=12, seed=3)[0]
    stats, _ = gather_unit_statistics(model, [x], units.layers, units.shape, reap=True, progress=False)
    u = stats.by_source["unit"].means(1)
    experts = lu.block.get_submodule(lu.experts.module)
    seen = {}
    gate = torch.ones(units.shape.experts, requires_grad=True)

    def pre(module, args):
        hidden, index, weights = args
        seen.update(hidden=hidden.detach(), index=index, weights=weights.detach())
        return hidden, index, weights * gate[index]

    h = experts.register_forward_pre_hook(pre)
    try:
        model(input_ids=x, labels=x).loss.backward()
    finally:
        h.remove()
    index, weights, hidden = seen["index"], seen["weights"], seen["hidden"]
    counts = torch.bincount(index.reshape(-1), minlength=units.shape.experts).float()
    assert torch.equal(u.ex_freq, counts / x.numel())
    for e in range(units.shape.experts):
        token, slot = torch.where(index == e)
        with torch.no_grad():
            y = experts(hidden[token], torch.full((len(token), 1), e), torch.ones(len(token), 1))
        want = (weights[token, slot] * y.norm(dim=-1)).sum() / max(len(token), 1)
        assert float(u.ex_reap[e]) == pytest.approx(float(want), rel=1e-4, abs=1e-7)
    assert torch.allclose(u.ex_z, gate.grad, rtol=1e-4, atol=1e-7)  # one batch: E_b z = z
    assert torch.allclose(u.ex_zz, gate.grad.square(), rtol=1e-4, atol=1e-10)


def test_channels_inside_experts_are_refit_per_expert():
    """With the default lsq refit on sequential inputs, every expert's down_proj is refit on its own
    routed inputs, and the refit leaves less output error than plain slicing."""
    model = BY_NAME["qwen2_moe"].build().eval()
    report = shrink_(model, _batches(model.config.vocab_size, n=8, seq=32),
                     StructureConfig(structure="channels", keep_channels=0.5), progress=False)  # fmt: skip
    layer = report["compensation"]["layers"][0]
    assert {"mlp.experts.0.down_proj", "mlp.shared_expert.down_proj"} <= set(layer)
    comp = report["compensation"]
    assert comp["error"]["mean"] < comp["removed_error"]["mean"]
    assert model.config.moe_intermediate_size == 16 and model.config.shared_expert_intermediate_size == 32


def test_other_families_and_other_structures_are_refused_in_one_line():
    from llm_gradprune.errors import ConfigError

    for name in ("gpt_neox", "opt", "gpt2", "falcon", "gpt_oss", "deepseek_v3", "llama4", "qwen3_next"):
        model = BY_NAME[name].build()
        with pytest.raises(ConfigError, match="structured pruning needs") as err:
            shrink_(model, _batches(model.config.vocab_size), StructureConfig(), progress=False)
        assert "\n" not in str(err.value) and type(model).__name__ in str(err.value)
    olmo = BY_NAME["olmo2"].build()
    with pytest.raises(ConfigError, match="q_norm.weight .* is per head"):
        shrink_(olmo, _batches(olmo.config.vocab_size), StructureConfig(structure="heads"), progress=False)
    llama = BY_NAME["llama_tied"].build()
    with pytest.raises(
        ConfigError, match="structure 'experts' removes routed experts, but LlamaForCausalLM has no"
    ):
        shrink_(llama, None, StructureConfig(structure="experts"), progress=False)
    mixtral = BY_NAME["mixtral"].build()
    with pytest.raises(
        ConfigError, match="keep_experts 0.25 keeps 1 of 4 experts per layer, fewer than the 2"
    ):
        shrink_(mixtral, None, StructureConfig(structure="experts", keep_experts=0.25, importance="magnitude"),
                progress=False)  # fmt: skip


def test_expert_removal_as_a_job_with_distillation_recovery(tmp_path, capsys):
    """`prune --structure experts` on a Qwen2-MoE folder: the report names the kept experts, the card's
    shape table the expert count before and after, recovery distils from the dense model right after,
    and stock from_pretrained loads the result with the smaller stock config."""
    import json

    from transformers import AutoModelForCausalLM

    from llm_gradprune import commands as cli

    from .tiny_folder import make_text_file, make_tokenizer

    model = tmp_path / "moe"
    BY_NAME["qwen2_moe"].build().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    text = make_text_file(tmp_path / "t.txt")
    out = tmp_path / "out"
    argv = ["prune", "--model", str(model), "--dataset", str(text), "--num-samples", "8", "--seq-len", "32",
            "--structure", "experts", "--keep-experts", "0.5", "--importance", "frequency", "--recover-steps", "2",
            "--recover-batch-size", "2", "--recover-distill-alpha", "0.5", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "num_experts 2" in capsys.readouterr().out
    report = json.loads((out / "pruning_report.json").read_text())
    kept = report["removed"]["experts_kept"]
    assert len(kept) == 2 and all(len(k) == 2 for k in kept.values())
    assert report["shape_after"]["num_experts"] == 2 and report["removed"]["experts_per_layer"] == 2
    rec = report["recovery"]
    assert rec["steps"] == 2 and rec["distill_alpha"] == 0.5 and rec["teacher"] is not None
    card = (out / "README.md").read_text()
    assert "| experts per MoE layer (`num_experts`) | 4 | 2 |" in card and "2 routed experts" in card
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.config.num_experts == 2 and loaded.model.layers[0].mlp.gate.weight.shape[0] == 2
    assert loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
