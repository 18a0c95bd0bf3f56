"""OWL allocation: hand-checked maths, exact overall counts, and more density where outliers are."""

import pytest
import torch

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.errors import ConfigError
from llm_gradprune.scoring.allocation import (
    exact_sparsities,
    layer_key,
    outlier_ratio,
    owl_densities,
    owl_sparsities,
)
from llm_gradprune.selection.select import num_to_prune

from .conftest import make_blocks, make_tiny_llama


def test_layer_key():
    assert layer_key("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_key("encoder.block.0.layer.1.DenseReluDense.wi.weight") == "encoder.block.0"
    assert layer_key("fc.weight") == "fc.weight"


def test_outlier_ratio_by_hand():
    # mean of [1, 1, 1, 1, 1, 1, 1, 9] is 2; above 2 * 2 = 4: only the 9 -> 1/8
    s = [torch.ones(2, 2), torch.tensor([[1.0, 1.0], [1.0, 9.0]])]
    assert outlier_ratio(lambda: iter(s), m=2.0) == pytest.approx(1 / 8)
    assert outlier_ratio(lambda: iter(s), m=5.0) == 0.0


def test_densities_spread_and_mean():
    # ratios 0, 0.1, 0.2 over equal sizes, s = 0.5, lambda = 0.1 -> densities 0.4, 0.5, 0.6
    d = owl_densities({"a": 0.0, "b": 0.1, "c": 0.2}, {"a": 10, "b": 10, "c": 10}, 0.5, 0.1)
    assert d == pytest.approx({"a": 0.4, "b": 0.5, "c": 0.6})
    # unequal sizes: the size-weighted mean density stays 1 - s
    d = owl_densities({"a": 0.0, "b": 1.0}, {"a": 30, "b": 10}, 0.5, 0.1)
    assert d["b"] - d["a"] == pytest.approx(0.2)
    assert (30 * d["a"] + 10 * d["b"]) / 40 == pytest.approx(0.5)
    assert owl_densities({"a": 0.3, "b": 0.3}, {"a": 1, "b": 1}, 0.7, 0.1) == pytest.approx(
        {"a": 0.3, "b": 0.3}
    )


@pytest.mark.parametrize("scope", ["tensor", "row"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_total_count(scope, sparsity):
    g = torch.Generator().manual_seed(1)
    shapes = {f"t{i}": (r, c) for i, (r, c) in enumerate([(6, 10), (2, 10), (6, 16), (12, 6), (2, 6)])}
    wish = torch.rand(5, generator=g) * 0.2 - 0.1  # +-0.1 around the target, as OWL asks
    total = sum(r * c for r, c in shapes.values())
    size = torch.tensor([r * c for r, c in shapes.values()], dtype=torch.float32)
    wish = wish - (wish * size).sum() / total + sparsity  # size-weighted mean = sparsity
    wanted = {n: float(v) for n, v in zip(shapes, wish, strict=True)}
    got = exact_sparsities(wanted, shapes, sparsity, scope)
    if scope == "tensor":
        pruned = sum(num_to_prune(got[n], r * c) for n, (r, c) in shapes.items())
    else:
        pruned = sum(r * num_to_prune(got[n], c) for n, (r, c) in shapes.items())
    assert pruned == num_to_prune(sparsity, total)  # every count above is a multiple of 2 (rows 2, 6, 12)
    for n, (_, c) in shapes.items():  # and each tensor stays near its wish (two steps at most)
        assert abs(got[n] - wanted[n]) <= 2 / (c if scope == "row" else 1) + 1e-9


def test_owl_sparsities_favour_planted_outliers():
    torch.manual_seed(0)
    shapes = {f"layers.{i}.{p}.weight": (8, 16) for i in range(4) for p in ("a", "b")}
    scores = {n: torch.rand(8, 16) + 0.5 for n in shapes}
    scores["layers.2.a.weight"][:, :3] = 50.0  # many outliers in layer 2
    per_tensor, layers = owl_sparsities(scores.__getitem__, shapes, 0.5, "row", m=5.0, lam=0.1)
    assert max(layers, key=lambda k: layers[k]["outlier_ratio"]) == "layers.2"
    # densities 0.4, 0.4, 0.6, 0.4 (spread 2 lambda), shifted by +0.05 to mean 0.5
    assert layers["layers.2"]["sparsity"] == pytest.approx(0.35)
    assert layers["layers.0"]["sparsity"] == pytest.approx(0.55)
    assert per_tensor["layers.2.a.weight"] == per_tensor["layers.2.b.weight"] < 0.5
    pruned = sum(8 * num_to_prune(s, 16) for s in per_tensor.values())
    assert pruned == 8 * 8 * 16 // 2


@pytest.mark.parametrize("criterion", ["magnitude", "fisher", "wanda"])
def test_owl_end_to_end_on_tiny_llama(criterion):
    """Layer 1 of a tiny Llama gets input outliers (scaled norm weights): it keeps more, total exact."""
    model = make_tiny_llama(layers=3)
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.input_layernorm.weight[:2] = 40.0
        layer.post_attention_layernorm.weight[:2] = 40.0
    cfg = PruneConfig(criterion=criterion, allocation="owl", allocation_params={"lambda": 0.1}, scope="row",
                      sparsity=0.5, progress=False)  # fmt: skip
    result = prune_(model, list(make_blocks(2, 16).split(1)), cfg)
    rep = result.report
    assert rep["masked_weights"] == rep["target_weights"] // 2  # overall exact
    per_layer = {k: v["sparsity"] for k, v in rep["allocation"].items()}
    assert min(per_layer, key=per_layer.get) == "model.layers.1"
    kept = {k: 0 for k in per_layer}
    size = dict.fromkeys(per_layer, 0)
    for name, mask in result.masks.items():
        kept[layer_key(name)] += int((~mask).sum())
        size[layer_key(name)] += mask.numel()
    density = {k: kept[k] / size[k] for k in kept}
    assert density["model.layers.1"] > 0.55 and max(density, key=density.get) == "model.layers.1"
    assert rep["allocation_method"] == "owl"


def test_owl_config_errors():
    with pytest.raises(ConfigError, match="global"):
        PruneConfig(allocation="owl", scope="global")
    with pytest.raises(ConfigError, match="'2:4'"):
        PruneConfig(allocation="owl", pattern="2:4")
    with pytest.raises(ConfigError, match="allocation 'owls' is unknown"):
        PruneConfig(allocation="owls")
    with pytest.raises(ConfigError, match=r"allocation 'owl' parameter lambda -0.1 must be >= 0"):
        PruneConfig(allocation="owl", allocation_params={"lambda": -0.1})
    # a layer sparsity would leave [0, 1): 0.5 + 0.9 > 1
    with pytest.raises(
        ConfigError, match=r"lambda 0.9 lets a layer's sparsity leave \[0, 1\) around sparsity 0.5"
    ):
        PruneConfig(allocation="owl", allocation_params={"lambda": 0.9})
    with pytest.raises(ConfigError, match="allocation 'uniform' has no parameter 'lambda'"):
        PruneConfig(allocation_params={"lambda": 0.1})
