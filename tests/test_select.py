"""Exact selection: hand-worked cases, ties, N:M, and agreement with torch.kthvalue / torch.quantile."""

import pytest
import torch

from llm_gradprune.masks import iter_masks
from llm_gradprune.select import kth_threshold, nm_mask, num_to_prune, order_keys, row_mask, tensor_mask


def test_num_to_prune_rounds_half_up():
    assert num_to_prune(0.5, 7) == 4  # 3.5 -> 4
    assert num_to_prune(0.5, 8) == 4
    assert num_to_prune(0.3, 10) == 3
    assert num_to_prune(0.0, 10) == 0


def test_order_keys_preserve_order_across_signs():
    x = torch.tensor([-3.0, -1.0, -0.0, 0.0, 1e-30, 2.0, float("inf"), float("-inf")])
    keys = order_keys(x)
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(x + 0.0, stable=True))
    assert keys[2] == keys[3]  # -0.0 and +0.0 are one value


def test_tensor_mask_hand_worked_with_ties():
    s = torch.tensor([[3.0, 1.0, 2.0], [1.0, 5.0, 1.0]])
    # 50% of 6 = 3 pruned: the three 1.0s (ties all fit)
    assert tensor_mask(s, 0.5).tolist() == [[False, True, False], [True, False, True]]
    # 2 of 6 (0.33 -> 1.98 -> 2): two of the three tied 1.0s, first in row-major order
    assert tensor_mask(s, 1 / 3).tolist() == [[False, True, False], [True, False, False]]


def test_row_mask_hand_worked_with_ties():
    s = torch.tensor([[4.0, 4.0, 4.0, 4.0], [9.0, 1.0, 8.0, 2.0]])
    assert row_mask(s, 0.5).tolist() == [[True, True, False, False], [False, True, False, True]]


def test_nm_mask_hand_worked():
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0, 7.0, 7.0, 7.0, 7.0]])
    # 2:4 keeps the two largest of each group of four; ties: lower index pruned first
    assert nm_mask(s, 2, 4).tolist() == [[True, False, False, True, True, True, False, False]]


def test_nm_mask_rejects_row_length():
    with pytest.raises(ValueError, match="divides by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_global_hand_worked_shares_one_threshold():
    scores = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[0.5, 2.0, 6.0, 2.0]])}
    out = dict(iter_masks(["a", "b"], scores.__getitem__, scope="global", sparsity=0.5,
                          shapes={k: v.shape for k, v in scores.items()}, chunk_elems=3))  # fmt: skip
    # 8 scores, prune 4: 0.5, 1.0, and two of the three 2.0s (a's first, then b's first)
    assert out["a"].tolist() == [[True, True], [False, False]]
    assert out["b"].tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_chunked_threshold_matches_sort_with_many_ties(chunk):
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 20, (37, 53), generator=g).float()
    for sparsity in (0.1, 0.5, 0.77):
        mask = tensor_mask(s, sparsity, chunk_elems=chunk)
        k = num_to_prune(sparsity, s.numel())
        order = torch.sort(s.reshape(-1), stable=True).indices[:k]  # ties by index
        expected = torch.zeros(s.numel(), dtype=torch.bool)
        expected[order] = True
        assert torch.equal(mask.reshape(-1), expected)
        rmask = row_mask(s, sparsity, chunk_elems=chunk)
        kr = num_to_prune(sparsity, s.shape[1])
        rexp = torch.zeros_like(s, dtype=torch.bool).scatter_(
            1, torch.sort(s, dim=1, stable=True).indices[:, :kr], True
        )
        assert torch.equal(rmask, rexp)


def test_selection_above_quantile_limit_matches_kthvalue():
    n = (1 << 24) + 4099  # torch.quantile refuses more than 2^24 elements
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 1000, (n,), generator=g).float() / 7  # heavy ties
    with pytest.raises(RuntimeError):
        torch.quantile(s, 0.5)
    k = num_to_prune(0.5, n)
    thr = kth_threshold(lambda: [s[: n // 3], s[n // 3 :]], k)
    assert thr.value == torch.kthvalue(s, k).values.item()
    mask = tensor_mask(s, 0.5, chunk_elems=1 << 22)
    assert int(mask.sum()) == k


def test_tensor_mask_agrees_with_quantile_recipe():
    s = torch.rand(1000, generator=torch.Generator().manual_seed(2))  # distinct values
    thr = torch.quantile(s, 0.5)  # midway between the 500th and 501st: exactly 500 below
    assert torch.equal(tensor_mask(s, 0.5), s < thr)
