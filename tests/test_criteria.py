"""Criteria against numbers worked out by hand on 2x2 tensors."""

import pytest
import torch

from llm_gradprune import criteria

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
    got = crit.score(W, STATS, weight_exp=1.0, act_exp=1.0, grad_exp=1.0)
    # |w| * rms(x) * rms(g): [[1*2*0.2, 2*1*0.3], [0.5*2*0.5, 0]]
    expected = torch.tensor([[0.4, 0.6], [0.5, 0.0]])
    torch.testing.assert_close(got[:, :][expected > 0].exp(), expected[expected > 0])
    assert got[1, 1] < got.min() + 1e-6 or got[1, 1] == got.min()  # the zero weight ranks last


def test_needs_are_minimal():
    assert criteria.get("magnitude").accumulators == set()
    assert criteria.get("taylor").accumulators == {"grad_sum"}
    assert criteria.get("gradient").accumulators == {"grad_abs_sum"}
    assert criteria.get("fisher").accumulators == {"grad_sq_sum"}
    assert criteria.get("wanda").accumulators == {"act_sq_sum"}
    assert criteria.get("gblm").accumulators == {"act_sq_sum", "grad_sq_sum"}


def test_fisher_orders_like_abs_w_times_rms_g():
    g = torch.Generator().manual_seed(0)
    w, g2 = torch.randn(8, 8, generator=g), torch.rand(8, 8, generator=g)
    a = criteria.fisher(w, g2).reshape(-1).argsort()
    b = (w.abs() * g2.sqrt()).reshape(-1).argsort()
    assert torch.equal(a, b)
