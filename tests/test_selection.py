"""Exact selection: hand-worked cases, ties, N:M, agreement with torch.kthvalue / torch.quantile, and the
sampled-bracket path on any data (ties, misses, refinement, disk-backed global)."""

import pytest
import torch

from llm_gradprune.selection import select as S
from llm_gradprune.selection.masks import empty_tensors, iter_masks
from llm_gradprune.selection.scorestore import ScoreStore
from llm_gradprune.selection.select import (
    Sampler,
    kth_threshold,
    nm_mask,
    num_to_prune,
    order_keys,
    row_mask,
    tensor_mask,
)


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
                          numel={k: v.numel() for k, v in scores.items()}, chunk_elems=3))  # fmt: skip
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


# -- sampled brackets at scale ---------------------------------------------------------------------
def sort_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the k smallest, ties by position (stable sort)."""
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[torch.sort(flat + 0.0, stable=True).indices[:k]] = True
    return out


def tied_scores(shape, seed, levels=13):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randint(-levels // 2, levels, shape, generator=g).float() / 3).to(torch.float32)
    s[torch.rand(shape, generator=g) < 0.05] = -0.0  # -0.0 and +0.0 are one value
    s.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), 0.0])
    return s


@pytest.fixture
def small_sample(monkeypatch):
    """A sample cap far below the data size, so the sampled path (not the exhaustive one) runs."""
    monkeypatch.setattr(S, "SAMPLE_CAP", 64)
    monkeypatch.setattr(Sampler.__init__, "__defaults__", (64, 0))
    monkeypatch.setitem(ScoreStore.__init__.__kwdefaults__, "sample_cap", 64)


@pytest.mark.parametrize("chunk", [23, 97, 4096, 1 << 20])  # 23 and 97 split rows of 53
@pytest.mark.parametrize("dist", ["ties", "smooth", "heavy"])
def test_tensor_and_row_masks_match_sort(small_sample, chunk, dist):
    g = torch.Generator().manual_seed(3)
    s = {
        "ties": tied_scores((37, 53), 0),
        "smooth": torch.randn(37, 53, generator=g),
        "heavy": torch.randn(37, 53, generator=g).mul(8).exp(),  # spans ~40 decades
    }[dist]
    for sparsity in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999):
        k = num_to_prune(sparsity, s.numel())
        assert torch.equal(
            tensor_mask(s, sparsity, chunk_elems=chunk).reshape(-1), sort_mask(s.reshape(-1), k)
        )
        kr = num_to_prune(sparsity, s.shape[1])
        rexp = torch.stack([sort_mask(row, kr) for row in s])
        assert torch.equal(row_mask(s, sparsity, chunk_elems=chunk), rexp)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9])
def test_threshold_equals_kthvalue_and_counts(small_sample, sparsity):
    s = tied_scores((5000,), 1, levels=40)
    k = num_to_prune(sparsity, s.numel())
    thr = kth_threshold(lambda: S.flat_chunks(s, 333), k)
    assert thr.value == torch.kthvalue(s, k).values.item()
    assert thr.ties == k - int((s < thr.value).sum())


def test_wrong_sample_still_exact():
    """The sample only brackets: a sample of other data (bracket far off) must not change the answer."""
    s = torch.randn(20000, generator=torch.Generator().manual_seed(4))
    k = 7000
    for offset in (-100.0, 100.0):
        bad = Sampler(cap=256)
        bad.add(torch.randn(20000, generator=torch.Generator().manual_seed(5)) + offset)
        thr = kth_threshold(lambda: S.flat_chunks(s, 1000), k, sample=bad)
        assert thr.value == torch.kthvalue(s, k).values.item()


def test_wide_bracket_is_refined(small_sample, monkeypatch):
    monkeypatch.setattr(S, "HIST_BITS", 3)  # force several histogram passes
    s = torch.randn(3000, generator=torch.Generator().manual_seed(6)).mul(5).exp()
    for k in (1, 1500, 3000):
        assert kth_threshold(lambda: S.flat_chunks(s, 700), k).value == torch.kthvalue(s, k).values.item()


def test_nan_scores_are_refused(small_sample):
    s = torch.rand(1000)
    s[500] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tensor_mask(s, 0.5, chunk_elems=100)


def test_sampler_is_deterministic_and_bounded():
    data = [torch.rand(n, generator=torch.Generator().manual_seed(n)) for n in (10, 5000, 70000, 3)]
    a, b = Sampler(cap=1000), Sampler(cap=1000)
    for d in data:
        a.add(d)
        b.add(d)
    assert torch.equal(a.values(), b.values())
    assert a.values().numel() <= 1000 and a.total == 75013 and not a.exhaustive


@pytest.mark.parametrize("chunk", [7, 50, 1 << 20])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.83])
def test_global_on_disk_equals_in_memory_and_sort(small_sample, tmp_path, chunk, sparsity):
    scores = {
        "a": tied_scores((9, 11), 7),
        "b": tied_scores((4, 5, 3), 8),
        "c": torch.randn(30, 2, generator=torch.Generator().manual_seed(9)),
    }
    names, shapes = list(scores), {n: t.shape for n, t in scores.items()}
    kw = dict(
        scope="global", sparsity=sparsity, chunk_elems=chunk, numel={n: s.numel() for n, s in shapes.items()}
    )
    mem = dict(iter_masks(names, scores.__getitem__, **kw))
    disk = dict(iter_masks(names, scores.__getitem__, scores_dir=str(tmp_path), **kw))
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    expected = sort_mask(flat, num_to_prune(sparsity, flat.numel()))
    got = torch.cat([mem[n].reshape(-1) for n in names])
    assert torch.equal(got, expected)
    for n in names:
        assert torch.equal(disk[n], mem[n]), n
    assert list(tmp_path.iterdir()) == []  # temporary score files removed


def test_score_files_are_safetensors(tmp_path):
    from safetensors import safe_open

    t = torch.randn(6, 7)
    with ScoreStore(tmp_path, chunk_elems=5) as store:
        store.write("model.layers.0.mlp.up_proj.weight", t)
        ((path, _, _),) = store.entries.values()
        with safe_open(str(path), framework="pt") as fh:
            assert torch.equal(fh.get_tensor("model.layers.0.mlp.up_proj.weight"), t)
        assert [c.numel() for c in store.read_chunks("model.layers.0.mlp.up_proj.weight")] == [5] * 8 + [2]
        assert torch.equal(store.read("model.layers.0.mlp.up_proj.weight"), t)
        with pytest.raises(ValueError, match="written already"):
            store.write("model.layers.0.mlp.up_proj.weight", t)


def test_empty_tensors_are_found_per_scope():
    shapes = {"a": (4, 8), "b": (2, 3)}
    assert empty_tensors({"a": 0.5, "b": 1.0}, shapes, "tensor", None) == ["b"]
    assert empty_tensors({"a": 0.97, "b": 0.9}, shapes, "row", None) == ["a", "b"]  # round(0.97*8) = 8
    assert empty_tensors({"a": 0.9, "b": 0.9}, shapes, "tensor", None) == []  # 29 of 32, 5 of 6
    assert empty_tensors({"a": 0.99}, {"a": (4, 8)}, "tensor", (2, 4)) == []  # N:M keeps N of every M
