"""Experts pruned one by one (issue 22): statistics of expert e come from the tokens the router sent to
e, every criterion, scope, pattern and update rule runs on expert matrices, an expert with no routed
token follows the documented rule, older layouts (experts as separate Linears) behave the same, and
recovery keeps every pruned expert weight at zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_gradprune import JobConfig, PruneConfig, prune_
from llm_gradprune.calibration.stats import make_statistics
from llm_gradprune.errors import ConfigError
from llm_gradprune.recovery.config import RecoverConfig
from llm_gradprune.recovery.trainer import recover_
from llm_gradprune.targets import find_targets

from .families import BY_NAME

pytestmark = pytest.mark.slow


def _batches(n: int = 4, seq: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 128, (n, seq), generator=g).split(2))


def _routed_inputs(model, layer: int, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """By hand: for each expert of Mixtral layer `layer`, the hidden states routed to it and its
    intermediate activations act(gate) * up, from the router's own top-k."""
    moe = model.model.layers[layer].mlp
    seen = {}
    h = moe.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = seen["x"]
    _, _, top = moe.gate(x)
    out = {}
    for e in range(moe.experts.num_experts):
        rows = (top == e).any(-1)
        xe = x[rows]
        gate, up = nn.functional.linear(xe, moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
        out[e] = (xe, moe.experts.act_fn(gate) * up)
    return out


def test_expert_statistics_come_from_the_tokens_routed_to_it():
    model = BY_NAME["mixtral"].build()
    ids = _batches(2, 32)[0]
    targets = find_targets(model)
    stats = make_statistics({"hessian", "act_sq_mean", "grad_sq_mean"}, targets)
    for acc in stats.accumulators():
        acc.attach()
    model(input_ids=ids, labels=ids).loss.backward()
    for acc in stats.accumulators():
        acc.detach()
    by_hand = _routed_inputs(model, 1, ids)
    total = 0
    for e, (xe, inter) in by_hand.items():
        for pname, x in (("gate_up_proj", xe), ("down_proj", inter)):
            name = f"model.layers.1.mlp.experts.{e}.{pname}"
            assert stats.by_source["routed"].tokens[name] == x.shape[0]
            torch.testing.assert_close(stats.mean("hessian", name), 2 * x.T @ x / x.shape[0])
            torch.testing.assert_close(stats.mean("act_sq_mean", name), x.pow(2).mean(0))
        total += xe.shape[0]
    assert total == ids.numel() * model.config.num_experts_per_tok  # every token reached top-k experts


def test_expert_gradients_are_slices_of_the_fused_gradient():
    model = BY_NAME["gpt_oss"].build()  # transposed layout [E, in, out]
    ids = _batches(2, 32)[0]
    targets = find_targets(model)
    stats = make_statistics({"grad_sq_mean"}, targets)
    for acc in stats.accumulators():
        acc.attach()
    model(input_ids=ids, labels=ids).loss.backward()
    for acc in stats.accumulators():
        acc.detach()
    ref = BY_NAME["gpt_oss"].build()
    ref(input_ids=ids, labels=ids).loss.backward()
    fused = ref.model.layers[0].mlp.experts.down_proj.grad  # [E, I, H]: expert e is its transpose
    for e in range(fused.shape[0]):
        name = f"model.layers.0.mlp.experts.{e}.down_proj"
        torch.testing.assert_close(stats.mean("grad_sq_mean", name), fused[e].T.pow(2))


PATHS = [
    {"criterion": c, "scope": s}
    for c in ("magnitude", "gradient", "taylor", "fisher", "wanda", "gblm", "blend", "token_fisher", "ria")
    for s in ("tensor", "row", "global")
] + [
    {"criterion": "sparsegpt"},
    {"criterion": "sparsegpt", "pattern": "2:4"},
    {"criterion": "sparsegpt", "true_sequential": True},
    {"criterion": "sparsegpt", "sparsegpt_grad_exp": 0.5},
    {"criterion": "wanda", "pattern": "2:4", "reconstruct": "obs"},
    {"criterion": "fisher", "reconstruct": "lsq"},
    {"criterion": "token_fisher", "pattern": "2:4", "reconstruct": "lsq", "true_sequential": True},
    {"criterion": "wanda", "allocation": "owl", "owl_lambda": 0.2, "owl_m": 2.0},
    {"criterion": "wanda", "sequential": True},
]


@pytest.mark.parametrize("kw", PATHS, ids=lambda kw: "/".join(str(v) for v in kw.values()))
def test_every_criterion_scope_pattern_and_update_prunes_every_expert(kw):
    model = BY_NAME["mixtral"].build()
    before = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    # a tiny random model's global ranking empties whole tensors: allowed here, the counts are checked
    flat = {"progress": False, "allow_empty_tensors": kw.get("scope") == "global", **kw}
    report = prune_(model, _batches(), JobConfig.from_flat(flat).prune).report
    targets = find_targets(model)
    experts = {n: t for n, t in targets.items() if t.expert is not None}
    assert len(experts) == 16 and report["targets"] == 24
    zeros = sum(int((t.weight == 0).sum()) for t in targets.values())
    numel = sum(t.weight.numel() for t in targets.values())
    assert zeros == report["zero_weights"] and abs(zeros / numel - 0.5) < 0.01
    for name, t in experts.items():
        z = (t.weight == 0).float()
        if kw.get("pattern") == "2:4":
            assert (z.reshape(z.shape[0], -1, 4).sum(-1) == 2).all(), name
        elif kw.get("scope") == "row" and kw.get("allocation") is None:
            assert (z.sum(1) == z.shape[1] // 2).all(), name
        elif kw.get("scope") != "global" and kw.get("allocation") is None:
            assert z.mean() == 0.5, name
        assert report["per_tensor"][name]["zeros"] == int(z.sum())
    if kw.get("reconstruct") in ("obs", "lsq") or kw["criterion"] == "sparsegpt":
        after = model.model.layers[1].mlp.experts.down_proj
        kept = after != 0
        assert not torch.equal(after[kept], before[kept]), "the update rule did not touch the experts"


def test_an_expert_no_token_reaches_is_named_and_pruned_by_magnitude():
    model = BY_NAME["gpt_oss"].build()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[3] = -1e4  # the router never picks expert 3
    weights = {n: t.weight.detach().clone() for n, t in find_targets(model).items()}
    report = prune_(model, _batches(), PruneConfig(progress=False, criterion="wanda", scope="row")).report
    unrouted = [f"model.layers.{i}.mlp.experts.3" for i in range(2)]
    assert report["experts"]["unrouted"] == unrouted
    assert report["experts"]["routed_tokens"]["model.layers.0.mlp.experts.0"] > 0
    t = find_targets(model)["model.layers.0.mlp.experts.3.gate_up_proj"]
    w = weights["model.layers.0.mlp.experts.3.gate_up_proj"]
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(
        1, w.abs().topk(w.shape[1] // 2, dim=1).indices, True
    )
    assert torch.equal(t.weight != 0, keep)  # magnitude: the larger half of every row kept
    glob = BY_NAME["gpt_oss"].build()
    with torch.no_grad():
        for layer in glob.model.layers:
            layer.mlp.router.bias[3] = -1e4
    cfg = PruneConfig(progress=False, criterion="fisher", scope="global", allow_empty_tensors=True)
    r = prune_(glob, _batches(), cfg).report
    t = find_targets(glob)["model.layers.1.mlp.experts.3.down_proj"]
    assert (
        r["per_tensor"][t.key]["zeros"] == t.weight.numel() // 2
    )  # the target sparsity, outside the ranking
    assert abs(r["overall_sparsity"] - 0.5) < 1e-3


class _MLP(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.up, self.down = nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _OldMoe(nn.Module):
    """Experts as separate Linears and a Linear router (older checkpoints, remote code)."""

    def __init__(self, h: int = 16, e: int = 4):
        super().__init__()
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(_MLP(h, 32) for _ in range(e))

    def forward(self, x):
        top = self.gate(x).topk(2, dim=-1).indices
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (top == e).any(-1)
            if rows.any():
                out[rows] = out[rows] + expert(x[rows])
        return x + out


class _OldModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.layers = nn.ModuleList(_OldMoe() for _ in range(2))
        self.head = nn.Linear(16, 64, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _lm_loss(model, batch):
    logits = model(batch)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))


def test_separate_linear_experts_are_experts_and_their_router_is_not_a_target():
    torch.manual_seed(0)
    model = _OldModel()
    targets = find_targets(model)
    assert sorted(targets) == sorted(f"layers.{i}.experts.{e}.{p}" for i in range(2) for e in range(4)
                                     for p in ("up", "down"))  # fmt: skip
    assert {t.kind for t in targets.values()} == {"experts"}
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    report = prune_(model, batches, PruneConfig(progress=False, criterion="wanda"), loss_fn=_lm_loss).report
    assert report["matrices"]["routers"] == ["layers.0.gate.weight", "layers.1.gate.weight"]
    assert (model.layers[0].gate.weight != 0).all()


def test_recovery_trains_the_fused_experts_and_keeps_their_zeros():
    model = BY_NAME["qwen3_moe"].build()
    prune_(model, _batches(), PruneConfig(progress=False, criterion="wanda", pattern="2:4"))
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    pruned, before = fused == 0, fused.detach().clone()
    cfg = RecoverConfig(steps=3, lr=1e-3, warmup=0.0)
    model, rec = recover_(model, _batches(6, 16, seed=2), cfg, progress=False)
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(fused == 0, pruned) and not torch.equal(fused, before)
    assert rec["steps"] == 3


def test_lora_recovery_on_experts_is_refused_when_planned():
    from llm_gradprune.recovery.trainer import check_lora_targets

    targets = find_targets(BY_NAME["mixtral"].build())
    with pytest.raises(ConfigError, match=r"experts\.0\.gate_up_proj .*lora_r 0") as err:
        check_lora_targets(targets, 8)
    assert "\n" not in str(err.value)
    check_lora_targets(targets, 0)


class _Undeclared(nn.Module):
    """Fused experts [E, H, H]: square, and no is_transposed: the input side cannot be told."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 16, 16))


def test_fused_experts_of_unknown_layout_are_refused_in_one_line():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"experts": _Undeclared()}) for _ in range(2))
    with pytest.raises(ConfigError, match=r"layers\.0\.experts .*\[E, 16, 16\].*cannot be told") as err:
        find_targets(model)
    assert "\n" not in str(err.value)


def test_a_one_layer_decoder_keeps_its_head_out_of_the_targets():
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    targets = find_targets(AutoModelForCausalLM.from_config(config))
    assert len(targets) == 4 + 2 * 4 and not any("head" in n for n in targets)


def test_calibration_of_experts_resumes_bit_identically(tmp_path):
    """The saved calibration state holds the expert sums and routed-token counts: a crash and a resume
    give the sums and counts of one uninterrupted pass."""
    from llm_gradprune import JobConfig
    from llm_gradprune.calibration.loop import calibrate
    from llm_gradprune.io.calib_state import CalibState, run_identity

    class Crash(Exception):
        pass

    def run(state=None, crash_at=None):
        model = BY_NAME["qwen2_moe"].build()
        stats = make_statistics({"grad_sq_mean", "act_sq_mean"}, find_targets(model))
        seen = []

        def loss_fn(m, b):
            if crash_at is not None and len(seen) == crash_at:
                raise Crash
            seen.append(1)
            return m(input_ids=b, labels=b).loss

        calibrate(model, _batches(10, 16), stats, loss_fn=loss_fn, progress=False, calib_state=state)
        return stats

    identity = run_identity(JobConfig().identity(), BY_NAME["qwen2_moe"].build(), "d")
    ref = run()
    with pytest.raises(Crash):
        run(CalibState(tmp_path / "s", 2, False, identity), crash_at=3)
    got = run(CalibState(tmp_path / "s", 2, True, identity))
    assert got.by_source["routed"].tokens == ref.by_source["routed"].tokens
    for source in ("grad", "act"):
        want, have = ref.by_source[source].tensors(), got.by_source[source].tensors()
        assert want.keys() == have.keys() and any(".experts.3." in k for k in want)
        for key, t in want.items():
            assert torch.equal(t, have[key]), key
