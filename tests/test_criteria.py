"""Criteria against numbers worked out by hand: pure scores on 2x2 tensors, then statistics and scores
of a 2-layer toy, end to end through prune_.

Toy: y = W2 (W1 x), no biases, loss = y (one token per batch), two batches x = (2, 1) and (0, 1).

    W1 = [[1, 1], [1, -1]]   W2 = [[1, -2]]
    layer 0 inputs x:   mean x^2 = ((4 + 0)/2, (1 + 1)/2) = (2, 1)
    h = W1 x:           batch 1: (3, 1), batch 2: (1, -1) -> layer 1 mean h^2 = (5, 1)
    dL/dh = W2 = (1, -2), so dL/dW1 = outer((1, -2), x):
        batch 1: [[2, 1], [-4, -2]], batch 2: [[0, 1], [0, -2]]
        mean g = [[1, 1], [-2, -2]], mean |g| = [[1, 1], [2, 2]], mean g^2 = [[2, 1], [8, 4]]
    dL/dW2 = h^T: batch 1: [[3, 1]], batch 2: [[1, -1]]
        mean g = [[2, 0]], mean |g| = [[2, 1]], mean g^2 = [[5, 1]]
    One token per batch, so the per-token Fisher equals mean g^2.
"""

import math

import pytest
import torch
from torch import nn

from llm_gradprune import PruneConfig, prune_
from llm_gradprune.calibration.loop import calibrate
from llm_gradprune.calibration.stats import ActStats, GradStats, Statistics, TokenGradStats
from llm_gradprune.errors import ConfigError
from llm_gradprune.scoring import criteria

R2, R5 = math.sqrt(2.0), math.sqrt(5.0)
W1 = [[1.0, 1.0], [1.0, -1.0]]
W2 = [[1.0, -2.0]]
BATCHES = [torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, 1.0]])]
HAND = {
    "0": {"act_sq_mean": [2.0, 1.0], "grad_mean": [[1, 1], [-2, -2]], "grad_abs_mean": [[1, 1], [2, 2]],
          "grad_sq_mean": [[2, 1], [8, 4]]},
    "1": {"act_sq_mean": [5.0, 1.0], "grad_mean": [[2, 0]], "grad_abs_mean": [[2, 1]], "grad_sq_mean": [[5, 1]]},
}  # fmt: skip


W = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
STATS = {
    "grad_mean": torch.tensor([[0.1, 0.3], [-0.4, 1.0]]),
    "grad_abs_mean": torch.tensor([[0.2, 0.3], [0.4, 1.0]]),
    "grad_sq_mean": torch.tensor([[0.04, 0.09], [0.25, 1.0]]),
    "act_sq_mean": torch.tensor([4.0, 1.0]),
}


@pytest.mark.parametrize(
    ("name", "expected", "params"),
    [
        ("magnitude", [[1.0, 2.0], [0.5, 0.0]], {}),
        ("gradient", [[0.2, 0.3], [0.4, 1.0]], {}),
        ("taylor", [[0.1, 0.6], [0.2, 0.0]], {}),
        ("fisher", [[0.04, 0.36], [0.0625, 0.0]], {}),
        ("wanda", [[2.0, 2.0], [1.0, 0.0]], {}),
        # |w| * (rms(x) + 10 * rms(g)): row 0: 1*(2+2)=4, 2*(1+3)=8; row 1: 0.5*(2+5)=3.5, 0
        ("gblm", [[4.0, 8.0], [3.5, 0.0]], {"alpha": 10.0}),
    ],
)
def test_scores_by_hand(name, expected, params):
    crit = criteria.get(name)
    got = crit.score(W, {k: STATS[k] for k in crit.needs}, **params)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_blend_is_log_of_product():
    crit = criteria.get("blend")
    got = crit.score(W, STATS, weight=1.0, act=1.0, grad=1.0)
    # |w| * rms(x) * rms(g): [[1*2*0.2, 2*1*0.3], [0.5*2*0.5, 0]]
    expected = torch.tensor([[0.4, 0.6], [0.5, 0.0]])
    torch.testing.assert_close(got[:, :][expected > 0].exp(), expected[expected > 0])
    assert got[1, 1] < got.min() + 1e-6 or got[1, 1] == got.min()  # the zero weight ranks last


def test_needs_are_minimal():
    assert criteria.get("magnitude").needs == ()
    assert criteria.get("taylor").needs == ("grad_mean",)
    assert criteria.get("gradient").needs == ("grad_abs_mean",)
    assert criteria.get("fisher").needs == ("grad_sq_mean",)
    assert criteria.get("wanda").needs == ("act_sq_mean",)
    assert criteria.get("gblm").needs == ("act_sq_mean", "grad_sq_mean")
    assert criteria.get("ria").needs == ("act_sq_mean",)
    sgpt = criteria.get("sparsegpt")
    assert sgpt.statistics(sgpt.resolve_params({})) == {"hessian"}  # plain SparseGPT: Hessians only
    assert sgpt.statistics(sgpt.resolve_params({"grad_exp": 1.0, "prior": "token_fisher"})) == {
        "hessian",
        "token_grad_sq_mean",
        "act_sq_mean",
    }


def test_ria_by_hand():
    """|w| = [[1, 2], [0.5, 0]]: row sums (3, 0.5), column sums (1.5, 2); rms(x) = (2, 1), a = 0.5 and 1.
    RI = [[1/3 + 1/1.5, 2/3 + 2/2], [0.5/0.5 + 0.5/1.5, 0]] = [[1, 5/3], [4/3, 0]]."""
    crit = criteria.get("ria")
    ri = torch.tensor([[1.0, 5 / 3], [4 / 3, 0.0]])
    torch.testing.assert_close(crit.score(W, STATS, a=1.0), ri * torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(crit.score(W, STATS), ri * torch.tensor([2.0**0.5, 1.0]))
    assert crit.resolve_params({}) == {"a": 0.5}


def test_parameters_are_declared_checked_and_named():
    assert criteria.get("gblm").resolve_params({}) == {"alpha": 100.0}
    assert criteria.get("blend").resolve_params({"grad": 1}) == {"weight": 1.0, "act": 1.0, "grad": 1.0}
    with pytest.raises(ConfigError, match=r"criterion 'blend' parameter weight 'abc' must be a number"):
        criteria.get("blend").resolve_params({"weight": "abc"})
    with pytest.raises(
        ConfigError, match=r"criterion 'fisher' has no parameter 'alpha' \(its parameters: none\)"
    ):
        criteria.get("fisher").resolve_params({"alpha": 1})
    with pytest.raises(ConfigError, match="criterion 'snip' is unknown: choose one of magnitude"):
        criteria.get("snip")


def test_fisher_orders_like_abs_w_times_rms_g():
    g = torch.Generator().manual_seed(0)
    w, g2 = torch.randn(8, 8, generator=g), torch.rand(8, 8, generator=g)
    a = criteria.fisher(w, g2).reshape(-1).argsort()
    b = (w.abs() * g2.sqrt()).reshape(-1).argsort()
    assert torch.equal(a, b)


def toy() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W1))
        model[1].weight.copy_(torch.tensor(W2))
    return model


def loss_fn(model, batch):
    return model(batch).sum()


def measured() -> dict[str, dict[str, torch.Tensor]]:
    model = toy()
    targets = {"0": model[0], "1": model[1]}
    params = {n: m.weight for n, m in targets.items()}
    gs = GradStats(params, ("grad_sum", "grad_abs_sum", "grad_sq_sum"))
    acts = ActStats(targets)
    tok = TokenGradStats(targets)
    calibrate(
        model, BATCHES, Statistics({"grad": gs, "act": acts, "token": tok}), loss_fn=loss_fn, progress=False
    )
    return {
        n: {
            "act_sq_mean": acts.mean_sq(n),
            "grad_mean": gs.mean("grad_sum", n),
            "grad_abs_mean": gs.mean("grad_abs_sum", n),
            "grad_sq_mean": gs.mean("grad_sq_sum", n),
            "token_grad_sq_mean": tok.mean("token_grad_sq_sum", n),
        }
        for n in targets
    }


def test_statistics_by_hand():
    got = measured()
    for layer, stats in HAND.items():
        for name, value in stats.items():
            torch.testing.assert_close(got[layer][name], torch.tensor(value, dtype=torch.float32))
        torch.testing.assert_close(got[layer]["token_grad_sq_mean"], got[layer]["grad_sq_mean"])


@pytest.mark.parametrize(
    ("name", "params", "layer0", "layer1"),
    [
        # |w| * rms(x): rms(x) = (sqrt 2, 1) and (sqrt 5, 1)
        ("wanda", {}, [[R2, 1], [R2, 1]], [[R5, 2]]),
        # |w| * (rms(x) + alpha * rms(g)), alpha = 1: rms(g) = [[sqrt2, 1], [2 sqrt2, 2]] and [[sqrt5, 1]]
        ("gblm", {"alpha": 1.0}, [[2 * R2, 2], [3 * R2, 3]], [[2 * R5, 4]]),
        # alpha = 0.5: layer 0 row 1 = 1 * (sqrt2 + 0.5 * 2 sqrt2) = 2 sqrt2
        ("gblm", {"alpha": 0.5}, [[1.5 * R2, 1.5], [2 * R2, 2]], [[1.5 * R5, 3]]),
        # w^2 * per-token Fisher (= mean g^2 with one token per batch)
        ("token_fisher", {}, [[2, 1], [8, 4]], [[5, 4]]),
    ],
)
def test_toy_scores_by_hand(name, params, layer0, layer1):
    stats = measured()
    crit = criteria.get(name)
    model = toy()
    for layer, want in (("0", layer0), ("1", layer1)):
        w = model[int(layer)].weight
        got = crit.score(w, {s: stats[layer][s] for s in crit.needs}, **params)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_blend_by_hand():
    """log(|w|^a rms(x)^b rms(g)^c) with (a, b, c) = (1, 1, 1) and (2, 1, 0.5)."""
    stats = measured()
    crit = criteria.get("blend")
    w0 = toy()[0].weight
    got = crit.score(w0, {s: stats["0"][s] for s in crit.needs}, weight=1, act=1, grad=1)
    # |w| rms(x) rms(g): [[1*sqrt2*sqrt2, 1*1*1], [1*sqrt2*2sqrt2, 1*1*2]] = [[2, 1], [4, 2]]
    torch.testing.assert_close(got.exp(), torch.tensor([[2.0, 1.0], [4.0, 2.0]]))
    got = crit.score(w0, {s: stats["0"][s] for s in crit.needs}, weight=2, act=1, grad=0.5)
    # rms(g)^0.5 = [[2^0.25, 1], [8^0.25, 2^0.5]]
    want = torch.tensor([[R2 * 2**0.25, 1.0], [R2 * 8**0.25, R2]])
    torch.testing.assert_close(got.exp(), want)


def test_prune_uses_hand_scores():
    """gblm, alpha 1, per tensor 50%: layer 0 scores [[2.83, 2], [4.24, 3]] -> its first row goes."""
    model = toy()
    cfg = PruneConfig(
        criterion="gblm", criterion_params={"alpha": 1.0}, scope="tensor", sparsity=0.5, progress=False
    )
    result = prune_(model, BATCHES, cfg, loss_fn=loss_fn, targets={"0": model[0], "1": model[1]})
    assert result.masks["0.weight"].tolist() == [[True, True], [False, False]]
    assert result.masks["1.weight"].tolist() == [[False, True]]  # 2 sqrt5 = 4.47 > 4
    assert model[0].weight.tolist() == [[0.0, 0.0], [1.0, -1.0]]


def test_token_fisher_needs_only_its_own_statistic():
    crit = criteria.get("token_fisher")
    assert crit.statistics({}) == {"token_grad_sq_mean"}
    model = toy()
    cfg = PruneConfig(criterion="token_fisher", scope="row", sparsity=0.5, progress=False)
    result = prune_(model, BATCHES, cfg, loss_fn=loss_fn, targets={"0": model[0], "1": model[1]})
    # rows of [[2, 1], [8, 4]] and [[5, 4]]: the smaller of each row goes
    assert result.masks["0.weight"].tolist() == [[False, True], [False, True]]
    assert result.masks["1.weight"].tolist() == [[False, True]]


def test_token_fisher_differs_from_batch_fisher_with_several_tokens():
    """Two tokens per batch whose gradients cancel: batch Fisher is 0, the per-token one is not."""
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    batch = torch.tensor([[1.0], [-1.0]])  # loss = y1 + y2 = w*1 + w*(-1): gradient 0
    gs = GradStats({"l": lin.weight}, ("grad_sq_sum",))
    tok = TokenGradStats({"l": lin})
    calibrate(
        lin, [batch], Statistics({"grad": gs, "token": tok}), loss_fn=lambda m, b: m(b).sum(), progress=False
    )
    assert gs.mean("grad_sq_sum", "l").item() == 0.0
    assert tok.mean("token_grad_sq_sum", "l").item() == pytest.approx(1.0)  # (1*1)^2 + (1*-1)^2 over 2 tokens


def test_token_fisher_refuses_conv_layers_clearly():
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
    cfg = PruneConfig(criterion="token_fisher", progress=False)
    with pytest.raises(ConfigError, match="reads Linear, Conv1D and expert matrices only; '0' is none"):
        prune_(cnn, [torch.randn(1, 1, 3, 3)], cfg, loss_fn=lambda m, b: m(b).sum())
