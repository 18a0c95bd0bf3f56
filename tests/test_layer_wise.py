"""The layer-wise executor on tiny models: same outputs as the full model when nothing is pruned, any
block signature, stages, global scope, OWL, two processes, and end to end through prune_ -> save ->
from_pretrained."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llm_gradprune import JobConfig, PruneConfig, prune_
from llm_gradprune.errors import ConfigError
from llm_gradprune.executors.blocks import capture_block_inputs, run_block
from llm_gradprune.io.checkpoint import save_pruned
from llm_gradprune.targets import block_list_prefix

from .conftest import make_blocks, make_tiny_llama


def last_block_output(model, layers, ids):
    seen = []
    h = layers[-1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return seen[0]


@pytest.mark.parametrize("offload", [False, True])
def test_block_by_block_replays_the_full_forward(offload):
    model = make_tiny_llama(layers=3)
    layers = model.get_submodule(block_list_prefix(model))
    ids = make_blocks(3, 16)
    calls = capture_block_inputs(model, layers, list(ids.split(1)), store="cpu" if offload else None)
    assert len(calls) == 3 and "position_embeddings" in calls[0][1]  # captured, not hard-coded
    for index, block in enumerate(layers):
        calls.use_block(index)
        run_block(block, calls, torch.device("cpu"), keep_outputs=True)
    for i, (args, _) in enumerate(calls):
        assert torch.allclose(args[0], last_block_output(model, layers, ids[i : i + 1]), atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {"criterion": "sparsegpt"},
        {"criterion": "wanda", "reconstruct": "obs"},
        {"criterion": "fisher", "reconstruct": "lsq"},
        {"criterion": "wanda", "sequential": True, "offload_inputs": True},
    ],
)
def test_sparsity_zero_gives_the_full_models_logits(kw):
    ids = make_blocks(4, 16)
    ref = make_tiny_llama()(input_ids=ids).logits
    model = make_tiny_llama()
    result = prune_(model, list(ids.split(2)), PruneConfig(sparsity=0.0, progress=False, **kw))
    assert result.report["mode"]["layer_wise"] and result.report["zero_weights"] == 0
    assert result.report["mode"]["offload_inputs"] is bool(kw.get("offload_inputs"))
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)


class Block(nn.Module):
    """A block with its own call signature: positional extra input and a keyword-only argument."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, bias, *, scale):
        return h + scale * self.fc2(torch.relu(self.fc1(h + bias)))


class Toy(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.emb = nn.Embedding(16, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 16)

    def forward(self, ids):
        h = self.emb(ids)
        bias = torch.linspace(-1, 1, h.shape[-1])
        for b in self.blocks:
            h = b(h, bias, scale=0.5)
        return self.head(h)


def test_any_block_signature_and_sparsegpt_beats_masking_on_a_toy():
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (8, 12))
    loss_fn = lambda m, batch: m(batch).logsumexp(-1).mean()  # noqa: E731
    dense = Toy()
    with torch.no_grad():
        ref = dense(ids)
    errors = {}
    for name, kw in {
        "mask": {"criterion": "wanda", "sequential": True},
        "sgpt": {"criterion": "sparsegpt"},
    }.items():
        model = Toy()
        model.load_state_dict(dense.state_dict())
        cfg = PruneConfig(sparsity=0.5, progress=False, blocksize=4, **kw)
        result = prune_(model, list(ids.split(2)), cfg, loss_fn=loss_fn)
        assert result.report["targets"] == 6
        for block in model.blocks:  # exactly half of every block's weights are zero in the model itself
            assert int((block.fc1.weight == 0).sum()) == 64 and int((block.fc2.weight == 0).sum()) == 64
        errors[name] = float((model(ids).detach() - ref).norm())
    assert errors["sgpt"] < errors["mask"]


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsegpt_end_to_end_saves_and_reloads(tmp_path, pattern):
    model = make_tiny_llama()
    kw = {"pattern": pattern} if pattern != "unstructured" else {"sparsity": 0.5}
    cfg = PruneConfig(criterion="sparsegpt", blocksize=16, progress=False, **kw)
    result = prune_(model, list(make_blocks(4, 16).split(1)), cfg)
    rep = result.report
    assert rep["hessian_bytes"]["max_per_layer"] == 64 * 64 * 4  # down_proj reads 64 inputs
    # q/k/v share one Hessian of their 32 inputs, gate/up another; o_proj 32, down_proj 64
    assert rep["hessian_bytes"]["per_tensor"]["model.layers.0.self_attn.k_proj.weight"] == 32 * 32 * 4
    assert (
        rep["mode"]["sequential"]
        and rep["mode"]["reconstruct"] == "obs"
        and rep["mode"]["mask"] == "adaptive"
    )
    out = save_pruned(model, None, rep, tmp_path / "o", settings=JobConfig(prune=cfg).to_flat())
    params = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    for name, mask in result.masks.items():
        assert torch.equal(params[name] == 0, mask), name
        if pattern == "2:4":
            assert ((params[name].reshape(-1, 4) != 0).sum(1) == 2).all()


def test_gradient_prior_and_gradient_masks_with_obs_run():
    ids = list(make_blocks(4, 16).split(1))
    for kw in (
        {"criterion": "sparsegpt", "sparsegpt_grad_exp": 0.5},
        {"criterion": "blend", "reconstruct": "obs"},
    ):
        model = make_tiny_llama()
        rep = prune_(
            model, ids, JobConfig.from_flat({"pattern": "2:4", "progress": False, **kw}).prune
        ).report
        assert "grad_sq_sum" in rep["calibration"]["statistics"]
        assert rep["calibration"]["gradients"] == 4 and rep["calibration"]["batches"] == 4
        for name in rep["per_tensor"]:  # every group of 4 holds exactly 2 zeros in the model
            assert ((model.get_parameter(name).reshape(-1, 4) == 0).sum(1) == 2).all()


def test_token_fisher_prior_reads_its_statistics_and_changes_the_mask():
    ids = list(make_blocks(4, 16).split(1))
    masks = {}
    for exp in (0.0, 1.0):
        model = make_tiny_llama()
        cfg = PruneConfig(criterion="sparsegpt", pattern="2:4", progress=False,
                          criterion_params={"prior": "token_fisher", "grad_exp": exp})  # fmt: skip
        res = prune_(model, ids, cfg)
        assert all(t["nm_groups_valid"] for t in res.report["per_tensor"].values())
        masks[exp] = res.masks
    assert {"token_grad_sq_sum", "act_sq_sum"} <= set(res.report["calibration"]["statistics"])
    changed = sum(int((masks[0.0][n] != masks[1.0][n]).sum()) for n in masks[0.0])
    assert changed > 0


def test_token_fisher_with_obs_keeps_the_criterion_mask():
    """token_fisher reads only whole-model statistics, so layer-wise OBS must prune exactly the weights
    the plain (whole-model) token_fisher run prunes, and only move the kept ones."""
    ids = list(make_blocks(4, 16).split(1))
    plain_model, obs_model = make_tiny_llama(), make_tiny_llama()
    plain = prune_(plain_model, ids, PruneConfig(criterion="token_fisher", progress=False))
    obs = prune_(obs_model, ids, PruneConfig(criterion="token_fisher", reconstruct="obs", progress=False))
    assert "token_grad_sq_sum" in obs.report["calibration"]["statistics"]
    moved = 0
    for name, mask in plain.masks.items():
        assert torch.equal(mask, obs.masks[name])
        w_plain, w_obs = plain_model.get_parameter(name), obs_model.get_parameter(name)
        assert torch.equal(w_obs == 0, w_plain == 0)
        moved += int((w_obs != w_plain).sum())
    assert moved > 0


def test_sparsegpt_lsq_keeps_the_mask_and_refits_from_the_dense_weights():
    """lsq after sparsegpt must start from the dense weights: refitting the already-updated ones would
    see every pruned weight as 0 and change nothing."""
    ids = list(make_blocks(4, 16).split(1))
    runs = {}
    for rec in ("none", "lsq"):
        model = make_tiny_llama()
        cfg = PruneConfig(criterion="sparsegpt", pattern="2:4", reconstruct=rec, progress=False)
        runs[rec] = (model, prune_(model, ids, cfg).masks)
    (m_obs, masks_obs), (m_lsq, masks_lsq) = runs["none"], runs["lsq"]
    first = next(iter(masks_obs))  # block 0 sees the same inputs in both runs, so the same mask
    assert torch.equal(masks_obs[first], masks_lsq[first])
    for name, mask in masks_lsq.items():
        w = m_lsq.get_parameter(name)
        assert torch.equal(w == 0, mask) and ((w.reshape(-1, 4) != 0).sum(1) == 2).all()
    assert not torch.equal(m_obs.get_parameter(first), m_lsq.get_parameter(first))


def test_true_sequential_finds_the_llama_stages_and_prunes_each_after_the_ones_before():
    from llm_gradprune.executors.blocks import call_stages

    model = make_tiny_llama(layers=2)
    layers = model.get_submodule(block_list_prefix(model))
    ids = make_blocks(4, 16)
    calls = capture_block_inputs(model, layers, list(ids.split(1)))
    mods = {n: m for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)}
    stages = call_stages(layers[0], mods, calls[:1], torch.device("cpu"))
    assert stages == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]  # fmt: skip

    batches = list(ids.split(1))
    results = {}
    for staged in (False, True):
        for kw in (
            {"criterion": "sparsegpt", "pattern": "2:4"},
            {"criterion": "wanda", "reconstruct": "obs"},
        ):
            model = make_tiny_llama(layers=2)
            res = prune_(model, batches, PruneConfig(true_sequential=staged, progress=False, **kw))
            assert res.report["mode"]["stages_per_block"] == ([4, 4] if staged else [1, 1])
            results[staged, kw["criterion"]] = res.masks
    for crit in ("sparsegpt", "wanda"):
        plain, staged = results[False, crit], results[True, crit]
        q = next(n for n in plain if "q_proj" in n)
        down = next(n for n in plain if "layers.0.mlp.down_proj" in n)
        assert torch.equal(plain[q], staged[q])  # the first stage sees the same inputs either way
        assert not torch.equal(plain[down], staged[down])  # later stages see the pruned stages' outputs


@pytest.mark.parametrize("criterion", ["fisher", "token_fisher"])
def test_global_scope_in_layer_wise_mode_prunes_the_whole_model_global_mask(criterion):
    ids = list(make_blocks(4, 16).split(1))
    kw = {"criterion": criterion, "scope": "global", "allow_empty_tensors": True, "progress": False}
    whole = prune_(make_tiny_llama(), ids, PruneConfig(**kw))
    obs_model = make_tiny_llama()
    obs = prune_(obs_model, ids, PruneConfig(reconstruct="obs", **kw))
    assert (
        obs.report["mode"]["layer_wise"] and obs.report["masked_weights"] == obs.report["target_weights"] // 2
    )
    per = [int(m.sum()) / m.numel() for m in obs.masks.values()]
    assert max(per) - min(per) > 0.05  # really non-uniform, not a per-tensor 50%
    for name, mask in whole.masks.items():
        assert torch.equal(mask, obs.masks[name]), name
        assert torch.equal(obs_model.get_parameter(name) == 0, mask)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"reconstruct": "exact"}, "reconstruct 'exact'"),
        ({"criterion": "sparsegpt", "pattern": "2:4", "blocksize": 6}, "multiple of M=4"),
        ({"percdamp": 0.0}, "percdamp"),
        (
            {"sparsegpt_grad_exp": 1.0},
            "sparsegpt_grad_exp applies to criterion 'sparsegpt', but the criterion is",
        ),
        ({"criterion": "sparsegpt", "sparsegpt_prior": "hessian"}, "parameter prior 'hessian' is not one of"),
        ({"criterion": "sparsegpt", "scope": "row"}, "scope 'row' does not apply to criterion 'sparsegpt'"),
        (
            {"pattern": "2:4", "sparsity": 0.3},
            "sparsity 0.3 conflicts with pattern 2:4, which fixes it at 0.5",
        ),
        ({"pattern": "2:4", "scope": "global"}, "scope 'global' conflicts with pattern 2:4"),
        ({"blocksize": 64}, "blocksize 64 applies to layer-wise mode only"),
        ({"true_sequential": True}, "true_sequential needs sequential layer-wise mode"),
        ({"criterion": "sparsegpt", "sequential": False, "true_sequential": True}, "sequential: False"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_flat(kw)


def test_explicit_settings_that_agree_are_accepted_and_defaults_replaced_are_noted():
    cfg = PruneConfig(pattern="2:4", sparsity=0.5)
    assert cfg.nm == (2, 4) and cfg.notes == []
    cfg = PruneConfig(pattern="2:4")
    assert cfg.sparsity == 0.5 and cfg.notes == ["sparsity set to 0.5 by pattern 2:4"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=str)
def test_every_shipped_pruning_config_is_valid(path):
    cfg = JobConfig.from_yaml(path, progress=False)
    assert cfg.model == "builtin:smollm2-135m" and cfg.output_dir
