"""`shrink_`: score units, choose one shape, slice the weights, compensate, and leave a smaller dense model.

    from llm_gradprune.structured import StructureConfig, shrink_, save_structured
    report = shrink_(model, batches, StructureConfig(structure="channels", target_params=0.75))
    save_structured(model, tokenizer, "out/small")   # stock AutoModelForCausalLM.from_pretrained loads it

The model is changed in place: every kept decoder layer is rebuilt by its own class from the new config
(so every attribute it derives from the config is right) and loaded with the sliced tensors, removed
layers leave the layer list, and `model.config` gets the new widths, head counts, explicit head_dim and
layer count (and mlp_bias / attention_bias with a mean bias). The refit of down_proj / o_proj reads the
inputs of the layer being shrunk: block by block on the outputs of the already shrunk blocks
(`refit_inputs: sequential`, `executors.blocks`), or the dense model's from the statistics pass.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..calibration.hessians import Hessians
from ..calibration.loop import LossFn, causal_lm_loss, gather_statistics
from ..calibration.stats import Statistics
from ..errors import ConfigError
from ..executors.blocks import capture_with_store, run_block
from ..offload import BlockStore
from .choose import Choice, check_reachable, choose, experts_kept, widths_at
from .compensate import refit_columns
from .config import StructureConfig
from .importance import IMPORTANCES, MLP_ROLES, LayerScores, LayerTensors
from .report import build_report
from .units import (
    LayerUnits,
    ModelUnits,
    Part,
    Shape,
    check_heads,
    config_accepts,
    find_units,
    head_options,
    new_config_values,
)
from .unitstats import UnitStats, consumers, gather_unit_statistics

BIAS_FLAGS = {"channels": ("mlp_bias", "down_proj"), "heads": ("attention_bias", "o_proj")}


def _check_bias(config, cfg: StructureConfig) -> None:
    if not cfg.mean_bias:
        return
    for kind in cfg.kinds:
        if kind in BIAS_FLAGS and not hasattr(config, BIAS_FLAGS[kind][0]):
            flag, proj = BIAS_FLAGS[kind]
            raise ConfigError(
                f"mean_bias puts a bias on {proj}, but {type(config).__name__} has no {flag} to save it with: "
                "drop mean_bias"
            )


def needs_whole_model(cfg: StructureConfig) -> bool:
    """Do the statistics read the whole model (importance statistics, a refit on the dense inputs)? With
    `offload` they are taken on the whole model, which is released before the blocks are shrunk."""
    imp = IMPORTANCES.get(cfg.importance)
    refit = cfg.compensate == "lsq" or cfg.mean_bias
    dense = refit and cfg.refit_inputs == "dense" and bool(set(cfg.kinds) & {"channels", "heads"})
    return bool(imp.weight_needs(cfg.importance_form) or imp.unit_needs(cfg.importance_form) or dense)


def _top_k(model) -> int:
    return getattr(model.config, "num_experts_per_tok", 1) or 1


def check_plan(model: nn.Module, cfg: StructureConfig) -> tuple[ModelUnits, list[tuple[int, int]]]:
    """Every refusal that depends on the model, before any text is read or statistic gathered: the
    units, the bias flags, per-head tensors, the head counts the config accepts, an MoE for experts, the
    experts kept and a reachable target. Returns (units, head options)."""
    units = find_units(model)
    _check_bias(model.config, cfg)
    options = head_options(model.config, units.shape, cfg.head_unit) if "heads" in cfg.kinds else []
    if "heads" in cfg.kinds:
        check_heads(units)
    if "experts" in cfg.kinds and not units.shape.experts:
        raise ConfigError(
            f"structure 'experts' removes routed experts, but {type(model).__name__} has no MoE layer"
        )
    if "experts" in cfg.explicit_keeps:
        experts_kept(units.shape, cfg.keep_experts, _top_k(model))
    if "channels" in cfg.explicit_keeps:
        widths_at(units.shape, cfg.keep_channels, cfg.channel_multiple)
    if cfg.target_params is not None and not cfg.explicit_keeps:
        check_reachable(units.shape, units.costs, cfg.kinds, options, cfg.target_params, cfg.channel_multiple,
                        cfg.structure, _top_k(model))  # fmt: skip
    return units, options


def _hessians_cover(stats: Statistics, layers: list[LayerUnits]) -> bool:
    """Do the gathered Hessians hold every consumer's inputs (an expert's may hold none: it was unrouted)?"""
    h = stats.by_source.get("hessian")
    if h is None:
        return False
    names = consumers(layers)
    return all(
        h.owner(n) in h.tokens and (t.expert is not None or h.tokens[h.owner(n)] > 0)
        for n, t in names.items()
    )


def _statistics(
    model, units: ModelUnits, batches, cfg: StructureConfig, stats: Statistics, loss_fn, progress
):
    """Fill in what the importance and the refit read and `stats` lacks; returns the passes' counters."""
    imp = IMPORTANCES.get(cfg.importance)
    passes: dict[str, Any] = {}
    missing = sorted(s for s in imp.weight_needs(cfg.importance_form) if not stats.has(s))
    unit_need = imp.unit_needs(cfg.importance_form)
    refit = cfg.compensate == "lsq" or cfg.mean_bias
    dense_inputs = refit and cfg.refit_inputs == "dense" and set(cfg.kinds) & {"channels", "heads"}
    have = stats.by_source.get("unit")
    reap = cfg.importance == "reap"
    need_unit = (unit_need == "backward" and (have is None or not have.backward)) or (
        (have is None or (reap and not have.reap))
        and (unit_need == "forward" or (dense_inputs and cfg.mean_bias))
    )
    need_hessians = bool(dense_inputs) and not _hessians_cover(stats, units.layers)
    if (missing or need_unit or need_hessians) and batches is None:
        raise ConfigError(f"importance {cfg.importance!r} with these settings needs calibration batches")
    if missing:
        ws, counters = gather_statistics(model, batches, set(missing), units.targets(), loss_fn=loss_fn,
                                         progress=progress, num_batches=len(batches))  # fmt: skip
        stats.by_source.update(ws.by_source)
        stats.needs |= ws.needs
        passes["weights"] = counters
    if need_unit or need_hessians:
        us, counters = gather_unit_statistics(
            model, batches, units.layers, units.shape, backward=unit_need == "backward" or (
                have is not None and have.backward), hessians=need_hessians, reap=reap, loss_fn=loss_fn,
            progress=progress,
        )  # fmt: skip
        if not need_unit:
            us.by_source.pop("unit")
        stats.by_source.update(us.by_source)
        passes["units"] = counters
    return passes


def _tensors(lu: LayerUnits, of) -> LayerTensors:
    """A LayerTensors of fp32 [out, in] rows of each unit part: of(target) is the target's whole matrix."""
    cache: dict[str, torch.Tensor] = {}

    def rows(part: Part) -> torch.Tensor:
        t = part.target
        if t.name not in cache:
            cache[t.name] = of(t).to(torch.float32)
        return part.rows(cache[t.name])

    return LayerTensors({r: rows(p) for r, p in lu.attn.items()},
                        [{r: rows(m.part(r)) for r in MLP_ROLES} for m in lu.mlps], [m.expert for m in lu.mlps])  # fmt: skip


def layer_scores(units: ModelUnits, cfg: StructureConfig, stats: Statistics, store=None) -> list[LayerScores]:
    """Every layer's unit scores; a layer whose weights are elsewhere (offload disk) is read for its turn."""
    imp = IMPORTANCES.get(cfg.importance)
    form = cfg.importance_form
    unit = stats.by_source.get("unit")
    out = []
    for lu in units.layers:
        away = store is not None and any(p.is_meta for p in lu.block.parameters())
        if away:
            store.fetch(lu.index, lu.block)
        weights = _tensors(lu, lambda t: t.weight.detach())
        per = None
        if imp.weight_needs(form):
            per = _tensors(lu, lambda t: stats.mean(imp.weight_stat, t.key).to(t.weight.device))
        means = unit.means(lu.index) if imp.unit_needs(form) else None
        out.append(imp.scores(form, weights, units.shape.geometry, per, means))
        if away:
            store.drop(lu.block)
    return out


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units of `size` rows (heads of head_dim rows)."""
    return (units.unsqueeze(1) * size + torch.arange(size, device=units.device)).reshape(-1)


def _refit(
    W: torch.Tensor, bias, keep: torch.Tensor, inputs, cfg: StructureConfig
) -> tuple[dict, dict | None]:
    """The consuming matrix's new weight (and bias) for kept input columns `keep`, plus refit info."""
    out = {}
    info = None
    if inputs is None:
        out["weight"] = W[:, keep].clone()
    else:
        second, mean = inputs
        Wk, b, info = refit_columns(W, second, keep.to(W.device), mean=mean, lsq=cfg.compensate == "lsq",
                                    bias=cfg.mean_bias, percdamp=cfg.refit_damp)  # fmt: skip
        out["weight"] = Wk.to(W.dtype)
        if b is not None:
            old = bias.detach().to(torch.float32) if bias is not None else 0.0
            out["bias"] = (old + b).to(W.dtype)
    if "bias" not in out and bias is not None:
        out["bias"] = bias.detach().clone()
    return out, info


def _cuts(lu: LayerUnits, choice: Choice, shape: Shape) -> tuple[dict, dict]:
    """({target name: [(part, kept rows of the part)]}, {consumer name: kept input columns}) of a layer."""
    i = lu.index
    rows: dict[str, list] = {}
    cols: dict[str, torch.Tensor] = {}
    if i in choice.channels:
        for m, keep in zip(lu.mlps, choice.channels[i], strict=True):
            for role in ("gate", "up"):
                rows.setdefault(m.part(role).target.name, []).append((m.part(role), keep))
            cols[m.down.target.name] = keep
    if i in choice.queries:
        qrows, kvrows = _rows(choice.queries[i], shape.head_dim), _rows(choice.groups[i], shape.head_dim)
        for role, keep in (("q", qrows), ("k", kvrows), ("v", kvrows)):
            rows.setdefault(lu.attn[role].target.name, []).append((lu.attn[role], keep))
        cols[lu.attn["o"].target.name] = qrows
    return rows, cols


def shrunk_state(
    lu: LayerUnits, choice: Choice, shape: Shape, cfg: StructureConfig, inputs: dict
) -> tuple[dict, dict]:
    """The block's state dict with its units sliced out and its consumers refit; (state, refit info).
    `inputs`: {consumer name: (E[x x^T], E[x] or None)} for a refit."""
    state = dict(lu.block.state_dict())
    rows, cols = _cuts(lu, choice, shape)
    info: dict[str, Any] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}  # fused expert parameter -> expert -> new matrix
    for name, t in lu.targets().items():
        if name not in rows and name not in cols:
            continue
        W = t.weight.detach()
        bias = getattr(t.module, "bias", None) if t.expert is None else None
        new = {"weight": W, **({"bias": bias.detach()} if bias is not None else {})}
        if name in rows:
            idx = torch.cat(
                [p.start + keep.to(W.device) for p, keep in sorted(rows[name], key=lambda x: x[0].start)]
            )
            new = {k: v[idx].clone() for k, v in new.items()}
        if name in cols:
            new, refit_info = _refit(new["weight"], new.get("bias"), cols[name], inputs.get(name), cfg)
            if refit_info is not None:
                info[name[len(lu.name) + 1 :]] = refit_info
        local = t.tensor_name[len(lu.name) + 1 :]
        if t.expert is None:
            state[local] = new["weight"]
            if "bias" in new:
                state[local.rsplit(".", 1)[0] + ".bias"] = new["bias"]
        else:
            stacks.setdefault(local, {})[t.expert] = new["weight"].T if t.transposed else new["weight"]
    for local, per in stacks.items():
        state[local] = torch.stack([per[e] for e in range(len(per))])
    if lu.index in choice.kept_experts:
        _keep_experts(state, lu, choice.kept_experts[lu.index])
    return state, info


def _keep_experts(state: dict, lu: LayerUnits, kept: torch.Tensor) -> None:
    """Keep the experts `kept` of the layer's fused stacks and the matching rows of its routers."""
    E = lu.experts.count  # noqa: N806
    prefixes = [lu.experts.module + "."] + [r.rsplit(".", 1)[0] + "." for r in lu.experts.routers]
    for key, t in state.items():
        if any(key.startswith(p) for p in prefixes) and t.dim() >= 1 and t.shape[0] == E:
            state[key] = t.index_select(0, kept.to(t.device)).clone()


def rebuild_block(block: nn.Module, config, layer_idx: int, state: dict) -> nn.Module:
    """A new block of the same class built from `config` and loaded with `state` (new biases: zeros)."""
    with torch.device("meta"):
        new = type(block)(config, layer_idx)
    ref = next(iter(state.values()))
    for key, t in new.state_dict().items():
        if key not in state:
            if not key.endswith("bias"):
                raise RuntimeError(f"the rebuilt layer has a tensor {key!r} the old one lacks")
            state[key] = torch.zeros(t.shape, dtype=ref.dtype, device=ref.device)
    new.load_state_dict(state, strict=True, assign=True)
    grad = next(block.parameters()).requires_grad
    for p in new.parameters():
        p.requires_grad_(grad)
    if any(t.is_meta for t in [*new.parameters(), *new.buffers()]):
        raise RuntimeError(f"the rebuilt {type(block).__name__} has a tensor its state dict does not set")
    return new.train(block.training)


def _param_counts(model: nn.Module, prefix: str) -> dict[str, int]:
    return {"decoder": sum(p.numel() for p in model.get_submodule(prefix).parameters()),
            "total": sum(p.numel() for p in model.parameters())}  # fmt: skip


def _new_config(model, units: ModelUnits, choice: Choice, cfg: StructureConfig) -> tuple[Any, dict, Shape]:
    s = units.shape
    shape = s.but(layers=s.layers - len(choice.removed_layers), widths=tuple(choice.widths.items()),
                  heads=choice.heads, kv_heads=choice.kv_heads, experts=choice.experts)  # fmt: skip
    kept = [i for i in range(s.layers) if i not in choice.removed_layers]
    values = new_config_values(model.config, shape, kept)
    if cfg.mean_bias and choice.channels:
        values["mlp_bias"] = True
    if cfg.mean_bias and choice.queries:
        values["attention_bias"] = True
    why = config_accepts(model.config, values)
    if why is not None:
        raise ConfigError(f"{type(model.config).__name__} refuses the shrunk shape {shape.to_dict()}: {why}")
    new = copy.deepcopy(model.config)
    for k, v in values.items():
        setattr(new, k, v)
    return new, values, shape


def _refit_inputs(lu: LayerUnits, hs: Hessians, means) -> dict[str, tuple]:
    """{consumer: (E[x x^T], E[x] or None)} of a layer's o and down matrices; an expert no calibration
    token reached has none (it is sliced without a refit)."""
    ch = [None] * len(lu.mlps) if means is None else means.ch_mean
    pairs = [(lu.attn["o"].target, None if means is None else means.hd_mean)]
    pairs += [(m.down.target, mean) for m, mean in zip(lu.mlps, ch, strict=True)]
    return {
        t.name: (hs.hessian(t.name) / 2, mean) for t, mean in pairs if hs.tokens.get(hs.owner(t.name), 0) > 0
    }


@torch.no_grad()
def _apply(model, units: ModelUnits, choice: Choice, cfg: StructureConfig, stats: Statistics, batches, loss_fn,
           store: BlockStore):  # fmt: skip
    """Slice, refit and rebuild every kept layer, one at a time from `store`; drop the removed ones;
    update model.config."""
    new_cfg, values, shape = _new_config(model, units, choice, cfg)
    refit = cfg.compensate == "lsq" or cfg.mean_bias
    changed = [lu for lu in units.layers if lu.index in choice.channels or lu.index in choice.queries]
    sequential = refit and cfg.refit_inputs == "sequential" and bool(changed)
    device = store.device
    blocks = model.get_submodule(units.prefix)
    calls = (
        capture_with_store(model, units.prefix, blocks, batches, loss_fn, device, store)
        if sequential
        else None
    )
    kept = [i for i in range(units.shape.layers) if i not in choice.removed_layers]
    last = max(lu.index for lu in changed) if changed else -1
    info: dict[int, dict] = {}
    for new_idx, i in enumerate(kept):
        lu = units.layers[i]
        store.fetch(i, lu.block)
        if sequential:
            calls.use_block(i)  # layer i's own mask and rotary embeddings, as the dense model called it
        inputs: dict[str, Any] = {}
        if refit and lu in changed:
            if sequential:
                hs, us = Hessians(consumers([lu])).attach(), UnitStats([lu], units.shape).attach()
                try:
                    run_block(lu.block, calls, device, keep_outputs=False)
                finally:
                    hs.detach()
                    us.detach()
            else:
                hs, us = stats.by_source["hessian"], stats.by_source.get("unit")
            inputs = _refit_inputs(lu, hs, us.means(i) if us is not None and cfg.mean_bias else None)
        state, info[i] = shrunk_state(lu, choice, units.shape, cfg, inputs)
        block = rebuild_block(lu.block, new_cfg, new_idx, state)
        blocks[i] = block
        if sequential and i < last:
            run_block(block, calls, device, keep_outputs=True)
        store.release(new_idx, block)
    parent, _, attr = units.prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList([blocks[i] for i in kept]))
    for k, v in values.items():
        setattr(model.config, k, v)
    for module in model.modules():  # the rebuilt layers read the model's own config from now on
        if getattr(module, "config", None) is new_cfg:
            module.config = model.config
    return shape, {i: v for i, v in info.items() if v}


def shrink_(
    model: nn.Module,
    batches: Iterable[Any] | None,
    cfg: StructureConfig | None = None,
    *,
    loss_fn: LossFn = causal_lm_loss,
    statistics: Statistics | None = None,
    progress: bool = True,
    offload: BlockStore | None = None,
) -> dict[str, Any]:
    """Remove whole units of `model` in place as `cfg` says; returns the report.

    `batches` (re-iterable: a list) feed the statistics the importance reads and the refit; `statistics`:
    statistics gathered before (per-weight ones from `gather_statistics`, unit ones from
    `gather_unit_statistics`), so a sweep calibrates once; what they lack is gathered from `batches`.
    `offload` (an `offload.BlockStore`): where the blocks live between their turns; the statistics are
    taken on the whole model first, then each block is shrunk in its turn.
    """
    cfg = cfg or StructureConfig()
    t0 = time.perf_counter()
    units, options = check_plan(model, cfg)
    batches = list(batches) if batches is not None else None
    before = _param_counts(model, units.prefix)
    stats = statistics if statistics is not None else Statistics()
    passes = _statistics(model, units, batches, cfg, stats, loss_fn, progress)
    t1 = time.perf_counter()
    store = offload or BlockStore(units.layers[0].attn["o"].weight.device)
    scores = layer_scores(units, cfg, stats, store)
    choice = choose(units.shape, units.costs, scores, cfg.kinds, options, target=cfg.target_params,
                    keeps=cfg.explicit_keeps, multiple=cfg.channel_multiple, structure=cfg.structure,
                    groups=[m.group for m in units.layers[0].mlps],
                    least_experts=_top_k(model))  # fmt: skip
    t2 = time.perf_counter()
    old_shape = units.shape
    store.release_all(model, units.prefix)
    shape, refits = _apply(model, units, choice, cfg, stats, batches, loss_fn, store)
    t3 = time.perf_counter()
    after = _param_counts(model, units.prefix)
    return build_report(cfg, old_shape, shape, before, after, choice, refits, passes,
                        {"statistics": t1 - t0, "choose": t2 - t1, "shrink": t3 - t2, "total": t3 - t0},
                        [(m.name, m.width) for m in units.layers[0].mlps])  # fmt: skip
