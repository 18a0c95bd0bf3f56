"""Structured pruning: exact equivalence of removing units zeroed by hand, the saved folder loading with
stock transformers, the refit against plain removal, refusals, and importance maths by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_gradprune.errors import ConfigError
from llm_gradprune.reconstruction.lsq import lsq_update_
from llm_gradprune.structured import (
    StructureConfig,
    find_units,
    gather_unit_statistics,
    save_structured,
    shrink_,
)
from llm_gradprune.structured.choose import choose, plan_heads, removal_curve
from llm_gradprune.structured.compensate import refit_columns, relative_error
from llm_gradprune.structured.importance import (
    IMPORTANCES,
    Geometry,
    LayerTensors,
    UnitMeans,
    block_influence,
    channel_sums,
    element_scores,
    flap_scores,
    group_block_sum,
    head_sums,
    vector_scores,
)
from llm_gradprune.structured.units import Shape, UnitCosts, head_options

from .conftest import make_blocks, make_tiny_llama


def make_tiny_qwen2(seed: int = 0, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # q/k/v biases are zero at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def make_tiny_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return MistralForCausalLM(config).eval()


def batches(n: int = 4, seq: int = 16) -> list[torch.Tensor]:
    return list(make_blocks(n, seq).split(1))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


# -- equivalence: removing units that were zeroed by hand changes nothing ---------------------------
def zero_channels_(model, per_layer: dict[int, list[int]]) -> None:
    """Zero the given channels of every MLP of each layer (gate and up rows, down columns)."""
    units = find_units(model)
    with torch.no_grad():
        for i, chans in per_layer.items():
            for m in units.layers[i].mlps:
                m.gate.weight[chans] = 0
                m.up.weight[chans] = 0
                m.down.weight[:, chans] = 0


def _zero_rows_(part, rows) -> None:
    part.weight[rows] = 0
    bias = getattr(part.target.module, "bias", None)
    if part.target.expert is None and bias is not None:
        bias[part.start + torch.as_tensor(rows)] = 0


@pytest.mark.parametrize("importance", ["fisher", "token_fisher", "taylor", "magnitude", "flap"])
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_removing_zeroed_channels_leaves_outputs_unchanged(make, importance):
    model = make()
    zero_channels_(model, {0: list(range(0, 64, 4)), 1: list(range(1, 64, 4))})  # 16 of 64 per layer
    x = make_blocks(3, 12, seed=1)
    ref = logits(model, x)
    cfg = StructureConfig(structure="channels", keep_channels=0.75, channel_multiple=1, importance=importance)
    report = shrink_(model, batches(), cfg, progress=False)
    assert model.config.intermediate_size == 48 and report["removed"]["channels"][0] == list(range(0, 64, 4))
    assert report["removed"]["channels"][1] == list(range(1, 64, 4))
    assert torch.allclose(logits(model, x), ref, atol=1e-5)
    assert report["compensation"]["error"]["max"] < 1e-6  # lsq: the removed columns carried nothing


def zero_heads_(model, heads: list[int], kv: list[int] = ()) -> None:
    units = find_units(model)
    hd = units.shape.head_dim
    with torch.no_grad():
        for lu in units.layers:
            a = lu.attn
            for h in heads:
                _zero_rows_(a["q"], list(range(h * hd, (h + 1) * hd)))
                a["o"].weight[:, h * hd : (h + 1) * hd] = 0
            for g in kv:
                for r in ("k", "v"):
                    _zero_rows_(a[r], list(range(g * hd, (g + 1) * hd)))


@pytest.mark.parametrize("importance", ["fisher", "taylor", "magnitude", "flap"])
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_removing_a_zeroed_kv_group_leaves_outputs_unchanged(make, importance):
    model = make()  # 4 query heads, 2 KV heads: group 1 = query heads 2, 3 and KV head 1
    zero_heads_(model, [2, 3], kv=[1])
    x = make_blocks(3, 12, seed=1)
    ref = logits(model, x)
    cfg = StructureConfig(structure="heads", keep_heads=0.5, head_unit="group", importance=importance)
    report = shrink_(model, batches(), cfg, progress=False)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (
        2,
        1,
        8,
    )
    assert report["removed"]["kv_heads_kept"][0] == [0] and report["removed"]["query_heads_kept"][1] == [0, 1]
    assert torch.allclose(logits(model, x), ref, atol=1e-5)


@pytest.mark.parametrize("importance", ["fisher", "token_fisher", "magnitude"])
def test_removing_zeroed_query_heads_inside_each_group_leaves_outputs_unchanged(importance):
    model = make_tiny_llama()
    zero_heads_(model, [1, 2])  # one query head of each group; both KV heads stay
    x = make_blocks(3, 12, seed=1)
    ref = logits(model, x)
    cfg = StructureConfig(structure="heads", keep_heads=0.5, head_unit="query", importance=importance)
    report = shrink_(model, batches(), cfg, progress=False)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert report["removed"]["query_heads_kept"][0] == [0, 3]
    assert torch.allclose(logits(model, x), ref, atol=1e-5)


@pytest.mark.parametrize("importance", ["block_influence", "fisher", "token_fisher"])
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_removing_an_identity_layer_leaves_outputs_and_generation_unchanged(make, importance):
    model = make(layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: an identity
        lu = find_units(model).layers[1]
        lu.attn["o"].weight.zero_()
        lu.mlps[0].down.weight.zero_()
    x = make_blocks(3, 12, seed=1)
    ref = logits(model, x)
    prompt = x[:1, :5]
    gen_ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
    report = shrink_(model, batches(), StructureConfig(structure="layers", keep_layers=0.67, importance=importance),
                     progress=False)  # fmt: skip
    assert report["removed"]["layers"] == [1] and model.config.num_hidden_layers == 2
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == 2
    assert torch.allclose(logits(model, x), ref, atol=1e-5)
    # the kept layers were renumbered, so the KV cache of generate addresses them right
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), gen_ref)


# -- the saved folder loads with stock transformers ------------------------------------------------
@pytest.mark.parametrize(
    "make,kw",
    [
        (make_tiny_llama, {"structure": "mixed", "target_params": 0.7, "mean_bias": True}),
        (
            make_tiny_llama,
            {"keep_channels": 0.5, "keep_heads": 0.5, "keep_layers": 0.5, "structure": "mixed"},
        ),
        (make_tiny_qwen2, {"structure": "mixed", "keep_heads": 0.5, "keep_channels": 0.75}),
        (make_tiny_mistral, {"structure": "heads", "keep_heads": 0.75, "importance": "token_fisher"}),
    ],
)
def test_saved_folder_loads_with_plain_from_pretrained_and_generates(tmp_path, make, kw):
    from transformers import AutoModelForCausalLM

    model = make()
    report = shrink_(model, batches(), StructureConfig(channel_multiple=1, **kw), progress=False)
    checked = save_structured(model, None, tmp_path / "small", report)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert type(loaded) is type(model)
    after = report["shape_after"]
    for key in (
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    ):
        assert getattr(loaded.config, key) == after[key]
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"]["total"]
    assert checked["bytes"] > 0 and (tmp_path / "small" / "structure_report.json").is_file()
    x = make_blocks(2, 10, seed=2)
    assert torch.allclose(logits(loaded, x), logits(model, x), atol=1e-5)
    out = loaded.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_mean_bias_is_saved_through_the_config_bias_flags(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama()
    cfg = StructureConfig(
        structure="mixed", keep_channels=0.5, keep_heads=0.5, mean_bias=True, channel_multiple=1
    )
    shrink_(model, batches(), cfg, progress=False)
    save_structured(model, None, tmp_path / "b")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert loaded.config.mlp_bias and loaded.config.attention_bias
    down = loaded.model.layers[0].mlp.down_proj
    assert down.bias is not None and float(down.bias.detach().abs().sum()) > 0


# -- compensation --------------------------------------------------------------------------------
def test_lsq_refit_reduces_the_mlp_output_error_versus_plain_removal():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=48, num_attention_heads=4)).eval()
    x = torch.randn(2048, 16) @ torch.randn(16, 16) + 0.5  # correlated inputs with a mean
    with torch.no_grad():
        h = nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        y = mlp.down_proj(h)
    keep = torch.arange(0, 48, 2)  # half the channels
    W = mlp.down_proj.weight.detach()
    S, mu = h.T @ h / h.shape[0], h.mean(0)
    plain = (y - h[:, keep] @ W[:, keep].T).square().sum()
    Wk, _, info = refit_columns(W, S, keep, percdamp=1e-6)
    refit = (y - h[:, keep] @ Wk.T).square().sum()
    Wb, b, info_b = refit_columns(W, S, keep, mean=mu, bias=True, percdamp=1e-6)
    both = (y - h[:, keep] @ Wb.T - b).square().sum()
    _, b_only, _ = refit_columns(W, S, keep, mean=mu, lsq=False, bias=True)
    bias_only = (y - h[:, keep] @ W[:, keep].T - b_only).square().sum()
    assert refit < 0.8 * plain and both <= refit * (1 + 1e-4) and bias_only < plain
    # the reported errors are the measured ones
    assert info["removed_error"] == pytest.approx(float(plain / y.square().sum()), rel=1e-3)
    assert info["error"] == pytest.approx(float(refit / y.square().sum()), rel=1e-3)
    assert info_b["error"] == pytest.approx(float(both / y.square().sum()), rel=1e-3)


def test_column_refit_equals_the_per_row_lsq_update_for_the_same_column_mask():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 12, generator=g) @ torch.randn(12, 12, generator=g)
    W = torch.randn(5, 12, generator=g)
    H = 2 * X.T @ X / 512
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    mask = torch.ones(5, 12, dtype=torch.bool)
    mask[:, keep] = False
    W_lsq = W.clone()
    lsq_update_(W_lsq, H, mask, percdamp=0.01)
    Wk, _, _ = refit_columns(W, H, keep, percdamp=0.01)  # damping is relative: H or H / 2 alike
    assert torch.allclose(Wk, W_lsq[:, keep], atol=1e-4)


def test_relative_error_by_hand():
    W = torch.tensor([[1.0, 2.0]])
    S = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # E[x1^2] = 2, E[x2^2] = 1, uncorrelated
    # dropping column 2: error 2^2 * 1 = 4, reference 1 * 2 + 4 * 1 = 6
    assert relative_error(W, torch.tensor([[1.0, 0.0]]), None, S, None) == pytest.approx(4 / 6)
    mu = torch.tensor([0.0, 1.0])  # x2 has mean 1 (variance 0): a bias of 2 replaces it exactly
    assert relative_error(W, torch.tensor([[1.0, 0.0]]), torch.tensor([2.0]), S, mu) == pytest.approx(0.0)


# -- refusals ------------------------------------------------------------------------------------
def test_a_model_outside_the_family_is_refused_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64))
    with pytest.raises(ConfigError) as err:
        shrink_(gpt2, batches(), StructureConfig())
    msg = str(err.value)
    assert "\n" not in msg and "GPT2LMHeadModel: layer 0 has attn.c_attn, which is none of these" in msg
    with pytest.raises(ConfigError, match="needs a decoder's list of layers; Sequential has none"):
        find_units(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"structure": "rows"}, "structure 'rows' is unknown"),
        ({"target_params": 1.5}, "target_params 1.5 is outside"),
        ({"keep_heads": 0.5}, "keep_heads sets the heads kept, but structure 'channels'"),
        ({"keep_channels": 0.5, "target_params": 0.7}, "conflicts with keep_channels"),
        (
            {"structure": "mixed", "importance": "magnitude"},
            "mixed.*which importance 'magnitude' does not give",
        ),
        ({"structure": "layers", "importance": "magnitude"}, "importance 'magnitude' has no layers form"),
        ({"structure": "mixed", "importance": "flap", "keep_channels": 0.5}, None),
        ({"structure": "layers", "importance": "flap"}, "importance 'flap' has no layers form"),
        ({"importance": "flap", "importance_form": "element"}, "does not apply to importance 'flap'"),
        ({"importance": "fisher", "importance_form": "row"}, "importance_form 'row' is unknown"),
        (
            {"structure": "layers", "mean_bias": True, "importance": "block_influence"},
            "structure 'layers' removes",
        ),
        ({"head_unit": "query"}, "head_unit 'query' applies to structure heads or mixed"),
        ({"refit_damp": 0}, "refit_damp 0 is outside"),
        ({"channel_multiple": 0}, "channel_multiple 0 must be"),
        ({"importance": "grad"}, "importance 'grad' is unknown"),
        ({"structure": "layers", "importance_form": "element"}, "importance_form 'element' ranks no layers"),
        ({"structure": "mixed", "keep_layers": 0.5, "importance_form": "element"}, "ranks no layers"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kw, match):
    if match is None:
        StructureConfig(**kw)  # explicit keep ratios: any importance with a form for that kind
        return
    with pytest.raises(ConfigError, match=match) as err:
        StructureConfig(**kw)
    assert "\n" not in str(err.value)


def test_mixed_activation_importance_is_refused_and_heads_target_too_large():
    with pytest.raises(ConfigError, match="mixed.*estimated loss increase, which importance 'flap'"):
        StructureConfig(structure="mixed", importance="flap")
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match=r"structure 'heads' can remove at most .* target_params 0.5"):
        shrink_(
            model, batches(), StructureConfig(structure="heads", target_params=0.5, importance="magnitude")
        )
    assert model.config.num_attention_heads == 4  # nothing changed


def test_mean_bias_needs_a_bias_flag_in_the_config():
    with pytest.raises(ConfigError, match="Qwen2Config has no mlp_bias"):
        shrink_(make_tiny_qwen2(), batches(), StructureConfig(mean_bias=True))


def test_llama_head_counts_must_divide_hidden_size_others_need_not():
    from transformers import LlamaConfig, Qwen2Config

    kw = {"hidden_size": 30, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 6}
    shape = Shape(2, 30, (("intermediate_size", 64),), 6, 3, 6)
    llama = head_options(LlamaConfig(**kw), shape)
    assert (2, 2) not in llama and (3, 2) in llama and (1, 2) in llama  # 30 % 4 != 0
    assert (2, 2) in head_options(Qwen2Config(**kw), shape)
    assert head_options(LlamaConfig(**kw), shape, "group") == [(3, 2), (1, 2)]
    assert head_options(LlamaConfig(**kw), shape, "query") == [(3, 2), (3, 1)]


# -- importance maths by hand --------------------------------------------------------------------
GEO = Geometry(heads=4, kv_heads=2, head_dim=1)


def test_channel_and_head_sums_by_hand():
    gate = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])  # 3 channels, hidden 2
    up = torch.ones(3, 2)
    down = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]])
    assert channel_sums(gate, up, down).tolist() == [3 + 2 + 2, 7 + 2 + 0, 1 + 2 + 4]
    q = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # 4 heads of head_dim 1, hidden 1
    k, v = torch.tensor([[10.0], [20.0]]), torch.tensor([[1.0], [2.0]])
    o = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    per_q, per_kv = head_sums(q, k, v, o, GEO)
    assert per_q.tolist() == [2, 3, 4, 5] and per_kv.tolist() == [11, 22]
    t = LayerTensors({"q": q, "k": k, "v": v, "o": o}, [{"gate": gate, "up": up, "down": down}], [None])
    s = element_scores(t, GEO)
    assert s.groups.tolist() == [2 + 3 + 11, 4 + 5 + 22] and s.layer == pytest.approx(float(
        q.sum() + k.sum() + v.sum() + o.sum() + gate.sum() + up.sum() + down.sum()))  # fmt: skip
    mag = IMPORTANCES.get("magnitude").scores(None, t, GEO)
    assert mag.channels[0][0] == pytest.approx(
        (1 + 4 + 1 + 1 + 1 + 1) ** 0.5
    )  # sqrt of gate^2 + up^2 + down^2
    assert mag.groups[0] == pytest.approx(
        (1 + 4 + 1 + 1 + 100 + 1) ** 0.5
    )  # q^2 + o^2 of heads 0, 1 + k^2 + v^2


def test_vector_forms_flap_and_block_influence_by_hand():
    pair = torch.tensor(
        [[1.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, -1.0], [0.0, 0.0, -1.0, 5.0]]
    )
    assert group_block_sum(pair, 2).tolist() == [1 + 2 + 2 + 3, 4 - 1 - 1 + 5]
    u = UnitMeans(ch_z=[torch.tensor([-1.0, 2.0])], ch_zz=[torch.tensor([3.0, 4.0])], ch_tt=[torch.tensor([5.0, 6.0])],
                  hd_z=torch.tensor([1.0, -3.0, 2.0, 2.0]), hd_zz=pair, hd_tt=2 * pair,
                  blk_z=-0.5, blk_zz=0.25, blk_tt=0.75)  # fmt: skip
    t = vector_scores(u, GEO, "taylor")
    assert (
        t.channels[0].tolist() == [1, 2]
        and t.queries.tolist() == [1, 3, 2, 2]
        and t.groups.tolist() == [2, 4]
    )
    assert t.layer == 0.5
    f = vector_scores(u, GEO, "fisher")
    assert f.queries.tolist() == [1, 3, 4, 5] and f.groups.tolist() == [8, 7] and f.layer == 0.25
    tok = vector_scores(u, GEO, "token_fisher")
    assert tok.channels[0].tolist() == [5, 6] and tok.groups.tolist() == [16, 14] and tok.layer == 0.75
    fl = flap_scores(UnitMeans(ch_var=[torch.tensor([2.0, 0.5])], hd_var=torch.tensor([1.0, 2.0, 3.0, 4.0])),
                     downs=[torch.tensor([[1.0, 2.0], [1.0, 0.0]])], o=torch.tensor([[1.0, 1.0, 2.0, 0.0]]), geo=GEO)  # fmt: skip
    assert fl.channels[0].tolist() == [2 * 2, 0.5 * 4] and fl.queries.tolist() == [1, 2, 12, 0]
    assert fl.groups.tolist() == [3, 12] and block_influence(0.75) == 0.25


def test_unit_removal_gradients_equal_autograd_gate_gradients():
    """z of a channel, a head and a layer equals d loss / d m for a gate m = 1 on that unit's output."""
    model = make_tiny_llama()
    units = find_units(model)
    x = make_blocks(1, 16, seed=5)
    stats, _ = gather_unit_statistics(model, [x], units.layers, units.shape, progress=False)
    u = stats.by_source["unit"].means(1)
    lu = units.layers[1]
    gates = {"ch": torch.ones(64, requires_grad=True), "hd": torch.ones(4, requires_grad=True),
             "blk": torch.ones(1, requires_grad=True)}  # fmt: skip

    def pre_down(mod, args):
        return (args[0] * gates["ch"],)

    def pre_o(mod, args):
        a = args[0]
        return ((a.reshape(*a.shape[:-1], 4, 8) * gates["hd"][:, None]).reshape(a.shape),)

    def block_hook(mod, args, kwargs, out):
        h_in = args[0] if args else kwargs["hidden_states"]
        return h_in + gates["blk"] * (out - h_in)

    hs = [lu.mlps[0].down.target.module.register_forward_pre_hook(pre_down),
          lu.attn["o"].target.module.register_forward_pre_hook(pre_o),
          lu.block.register_forward_hook(block_hook, with_kwargs=True)]  # fmt: skip
    model(input_ids=x, labels=x).loss.backward()
    for h in hs:
        h.remove()
    assert torch.allclose(u.ch_z[0], gates["ch"].grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(u.hd_z, gates["hd"].grad, atol=1e-6, rtol=1e-4)
    assert u.blk_z == pytest.approx(float(gates["blk"].grad), rel=1e-4, abs=1e-7)
    assert torch.allclose(
        u.ch_zz[0], gates["ch"].grad.square(), rtol=1e-4, atol=1e-10
    )  # one batch: E_b z^2 = z^2


# -- choosing the shape --------------------------------------------------------------------------
def test_plan_heads_and_removal_curve_by_hand():
    groups, queries = torch.tensor([5.0, 1.0, 3.0]), torch.tensor([4.0, 1.0, 2.0, 2.0, 9.0, 0.5])
    kept_g, kept_q, cost = plan_heads(groups, queries, kv_keep=2, r_keep=1)
    assert kept_g.tolist() == [0, 2] and kept_q.tolist() == [0, 4] and cost == 1.0 + 1.0 + 0.5
    assert removal_curve(torch.tensor([3.0, 1.0, 2.0])).tolist() == [0, 1, 3, 6]


def test_choose_meets_the_target_from_below_and_mixed_takes_the_cheapest():
    from llm_gradprune.structured.importance import LayerScores

    shape = Shape(layers=2, hidden=4, widths=(("intermediate_size", 8),), heads=2, kv_heads=1, head_dim=2)
    costs = UnitCosts(
        fixed=10, channel={"intermediate_size": 12}, query=16, kv=16
    )  # layer: 10 + 96 + 32 + 16 = 154
    s = [
        LayerScores([torch.arange(8.0)], torch.tensor([1.0, 50.0]), torch.tensor([100.0]), 1000.0)
        for _ in range(2)
    ]
    c = choose(shape, costs, s, ("channels",), [], target=0.75, multiple=1)
    # budget 115.5 per layer: (115.5 - 10 - 48) / 12 = 4.79 -> 4 channels, the highest scored
    assert (
        c.widths == {"intermediate_size": 4}
        and c.channels[0][0].tolist() == [4, 5, 6, 7]
        and c.params_after == 2 * 106
    )
    assert c.cost == 2 * (0 + 1 + 2 + 3)
    m = choose(shape, costs, s, ("channels", "heads", "layers"), [(1, 2), (1, 1)], target=0.75, multiple=1,
               structure="mixed")  # fmt: skip
    # dropping query head 0 (cost 1) frees 16 params: (115.5 - 10 - 32) / 12 -> 6 channels kept, cost 1 + 0 + 1
    assert (
        (m.group, m.widths["intermediate_size"]) == (1, 6)
        and m.cost == 2 * (1 + 0 + 1)
        and m.queries[0].tolist() == [1]
    )
    assert m.removed_layers == [] and m.params_after == 2 * (10 + 72 + 16 + 16)
