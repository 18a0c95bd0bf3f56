"""The whole-model executor end to end on a tiny random Llama: every criterion and scope, saved,
reloaded, counted; any nn.Module (a CNN); no calibration for magnitude."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llm_gradprune import JobConfig, PruneConfig, prune_
from llm_gradprune.io.checkpoint import save_pruned
from llm_gradprune.scoring.criteria import CRITERIA
from llm_gradprune.targets import find_targets

from .conftest import make_blocks, make_tiny_llama

# every criterion that scores (sparsegpt chooses its masks layer-wise: test_layer_wise.py)
BASIC = [
    c for c, crit in CRITERIA.items() if not crit.adaptive and not crit.block_local
]  # whole-model criteria


def untouched(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "proj" not in n}


@pytest.mark.parametrize("scope", ["tensor", "row", "global"])
@pytest.mark.parametrize("criterion", BASIC)
def test_prune_save_reload(tmp_path, criterion, scope):
    model = make_tiny_llama()
    before = untouched(model)
    cfg = PruneConfig(
        criterion=criterion, scope=scope, sparsity=0.5, progress=False, allow_empty_tensors=True
    )
    result = prune_(model, list(make_blocks(4, 16).split(1)), cfg)
    assert set(result.masks) == {f"{n}.weight" for n in find_targets(model)}
    assert len(result.masks) == 2 * 7
    out = save_pruned(model, None, result.report, tmp_path / "out", settings=JobConfig(prune=cfg).to_flat())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    params = dict(reloaded.named_parameters())
    total = 0
    for name, mask in result.masks.items():
        w = params[name]
        assert torch.equal(w == 0, mask), name  # random init has no zeros of its own
        total += int(mask.sum())
        if scope == "tensor":
            assert int(mask.sum()) == mask.numel() // 2
        if scope == "row":
            assert (mask.sum(1) == mask.shape[1] // 2).all()
    assert total == result.report["target_weights"] // 2 == result.report["zero_weights"]
    for n, p in before.items():  # embeddings, norms (and the tied lm_head) untouched
        if n in params:
            assert torch.equal(params[n], p), n
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)


def test_two_four_is_valid_group_by_group(tmp_path):
    model = make_tiny_llama()
    cfg = PruneConfig(criterion="fisher", pattern="2:4", progress=False)
    result = prune_(model, list(make_blocks(2, 16).split(1)), cfg)
    for name, mask in result.masks.items():
        groups = mask.reshape(-1, 4)
        assert (groups.sum(1) == 2).all(), name
    out = save_pruned(model, None, result.report, tmp_path / "o", settings=JobConfig(prune=cfg).to_flat())
    for name, p in AutoModelForCausalLM.from_pretrained(out).named_parameters():
        if name in result.masks:
            assert ((p.reshape(-1, 4) != 0).sum(1) == 2).all()


def test_library_prunes_a_cnn():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    )
    images = torch.randn(12, 3, 8, 8)
    labels = torch.randint(0, 10, (12,))
    batches = [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)]

    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    cfg = PruneConfig(criterion="taylor", scope="row", sparsity=0.25, progress=False)
    result = prune_(cnn, batches, cfg, loss_fn=loss_fn)
    assert set(result.masks) == {"0.weight", "2.weight", "4.weight"}
    for name, mask in result.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.sum(1) == round(0.25 * rows.shape[1])).all(), name
    assert result.report["calibration"]["batches"] == 3
    assert float((cnn[0].weight == 0).float().mean()) == pytest.approx(0.25, abs=0.01)


def test_magnitude_needs_no_batches():
    model = make_tiny_llama()
    result = prune_(model, None, PruneConfig(criterion="magnitude", scope="tensor", progress=False))
    assert result.report["calibration"]["batches"] == 0 and result.report["calibration"]["statistics"] == []
    for name, t in result.report["per_tensor"].items():  # exactly half of every tensor, the smallest |w|
        w = model.get_parameter(name)
        assert t["zeros"] == w.numel() // 2 == int((w == 0).sum())
