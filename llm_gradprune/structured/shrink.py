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
from ..executors.blocks import capture_block_inputs, run_block
from .choose import Choice, choose
from .compensate import refit_columns
from .config import StructureConfig
from .importance import IMPORTANCES, ROLES, LayerScores
from .report import build_report
from .units import LayerUnits, ModelUnits, Shape, config_accepts, find_units, head_options, new_config_values
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


def _hessians_cover(stats: Statistics, layers: list[LayerUnits]) -> bool:
    h = stats.by_source.get("hessian")
    return h is not None and all(h.tokens.get(h.owner(n), 0) > 0 for n in consumers(layers))


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
    need_unit = (unit_need == "backward" and (have is None or not have.backward)) or (
        have is None and (unit_need == "forward" or (dense_inputs and cfg.mean_bias))
    )
    need_hessians = bool(dense_inputs) and not _hessians_cover(stats, units.layers)
    if (missing or need_unit or need_hessians) and batches is None:
        raise ConfigError(f"importance {cfg.importance!r} with these settings needs calibration batches")
    if missing:
        ws, counters = gather_statistics(model, batches, set(missing), units.modules(), loss_fn=loss_fn,
                                         progress=progress, num_batches=len(batches))  # fmt: skip
        stats.by_source.update(ws.by_source)
        stats.needs |= ws.needs
        passes["weights"] = counters
    if need_unit or need_hessians:
        us, counters = gather_unit_statistics(
            model, batches, units.layers, units.shape, backward=unit_need == "backward" or (
                have is not None and have.backward), hessians=need_hessians, loss_fn=loss_fn, progress=progress,
        )  # fmt: skip
        if not need_unit:
            us.by_source.pop("unit")
        stats.by_source.update(us.by_source)
        passes["units"] = counters
    return passes


def layer_scores(units: ModelUnits, cfg: StructureConfig, stats: Statistics) -> list[LayerScores]:
    imp = IMPORTANCES.get(cfg.importance)
    form = cfg.importance_form
    unit = stats.by_source.get("unit")
    out = []
    for lu in units.layers:
        weights = {r: lu.modules[r].weight.detach().to(torch.float32) for r in ROLES}
        per = None
        if imp.weight_needs(form):
            stat = imp.weight_stat
            per = {r: stats.mean(stat, f"{lu.full(r)}.weight").to(weights[r].device) for r in ROLES}
        means = unit.means(lu.index) if imp.unit_needs(form) else None
        out.append(imp.scores(form, weights, units.shape.geometry, per, means))
    return out


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units of `size` rows (heads of head_dim rows)."""
    return (units.unsqueeze(1) * size + torch.arange(size, device=units.device)).reshape(-1)


def _refit(module: nn.Linear, keep: torch.Tensor, inputs, cfg: StructureConfig) -> tuple[dict, dict | None]:
    """The consuming projection's new weight (and bias) for kept input columns `keep`, plus refit info."""
    W = module.weight.detach()
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
            old = module.bias.detach().to(torch.float32) if module.bias is not None else 0.0
            out["bias"] = (old + b).to(W.dtype)
    if "bias" not in out and module.bias is not None:
        out["bias"] = module.bias.detach().clone()
    return out, info


def shrunk_state(
    lu: LayerUnits, choice: Choice, shape: Shape, cfg: StructureConfig, inputs: dict
) -> tuple[dict, dict]:
    """The block's state dict with its units sliced out and its consumers refit; (state, refit info)."""
    i, m = lu.index, lu.modules
    state = dict(lu.block.state_dict())
    info: dict[str, Any] = {}

    def put(role: str, tensors: dict) -> None:
        for k, t in tensors.items():
            state[f"{lu.local[role]}.{k}"] = t

    def rows(role: str, idx: torch.Tensor) -> dict:
        mod = m[role]
        idx = idx.to(mod.weight.device)
        out = {"weight": mod.weight.detach()[idx].clone()}
        if mod.bias is not None:
            out["bias"] = mod.bias.detach()[idx].clone()
        return out

    if i in choice.channels:
        keep = choice.channels[i]
        put("gate", rows("gate", keep))
        put("up", rows("up", keep))
        new, info["down"] = _refit(m["down"], keep, inputs.get("down"), cfg)
        put("down", new)
    if i in choice.queries:
        qrows = _rows(choice.queries[i], shape.head_dim)
        kvrows = _rows(choice.groups[i], shape.head_dim)
        put("q", rows("q", qrows))
        put("k", rows("k", kvrows))
        put("v", rows("v", kvrows))
        new, info["o"] = _refit(m["o"], qrows, inputs.get("o"), cfg)
        put("o", new)
    return state, {k: v for k, v in info.items() if v is not None}


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
    shape = Shape(s.layers - len(choice.removed_layers), s.hidden, choice.intermediate, choice.heads,
                  choice.kv_heads, s.head_dim)  # fmt: skip
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


@torch.no_grad()
def _apply(
    model, units: ModelUnits, choice: Choice, cfg: StructureConfig, stats: Statistics, batches, loss_fn
):
    """Slice, refit and rebuild every kept layer; drop the removed ones; update model.config."""
    new_cfg, values, shape = _new_config(model, units, choice, cfg)
    refit = cfg.compensate == "lsq" or cfg.mean_bias
    changed = [lu for lu in units.layers if lu.index in choice.channels or lu.index in choice.queries]
    sequential = refit and cfg.refit_inputs == "sequential" and bool(changed)
    device = units.layers[0].modules["down"].weight.device
    blocks = model.get_submodule(units.prefix)
    calls = (
        capture_block_inputs(model, blocks, batches, loss_fn=loss_fn, device=device) if sequential else None
    )
    kept = [i for i in range(units.shape.layers) if i not in choice.removed_layers]
    last = max(lu.index for lu in changed) if changed else -1
    info: dict[int, dict] = {}
    for new_idx, i in enumerate(kept):
        lu = units.layers[i]
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
            means = us.means(i) if us is not None and cfg.mean_bias else None
            inputs = {"down": (hs.hessian(lu.full("down")) / 2, None if means is None else means.ch_mean),
                      "o": (hs.hessian(lu.full("o")) / 2, None if means is None else means.hd_mean)}  # fmt: skip
        state, info[i] = shrunk_state(lu, choice, units.shape, cfg, inputs)
        block = rebuild_block(lu.block, new_cfg, new_idx, state)
        blocks[i] = block
        if sequential and i < last:
            run_block(block, calls, device, keep_outputs=True)
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
) -> dict[str, Any]:
    """Remove whole units of `model` in place as `cfg` says; returns the report.

    `batches` (re-iterable: a list) feed the statistics the importance reads and the refit; `statistics`:
    statistics gathered before (per-weight ones from `gather_statistics`, unit ones from
    `gather_unit_statistics`), so a sweep calibrates once; what they lack is gathered from `batches`.
    """
    cfg = cfg or StructureConfig()
    t0 = time.perf_counter()
    units = find_units(model)
    _check_bias(model.config, cfg)
    options = head_options(model.config, units.shape, cfg.head_unit) if "heads" in cfg.kinds else []
    batches = list(batches) if batches is not None else None
    before = _param_counts(model, units.prefix)
    stats = statistics if statistics is not None else Statistics()
    passes = _statistics(model, units, batches, cfg, stats, loss_fn, progress)
    t1 = time.perf_counter()
    scores = layer_scores(units, cfg, stats)
    choice = choose(units.shape, units.costs, scores, cfg.kinds, options, target=cfg.target_params,
                    keeps=cfg.explicit_keeps, multiple=cfg.channel_multiple, structure=cfg.structure)  # fmt: skip
    t2 = time.perf_counter()
    old_shape = units.shape
    shape, refits = _apply(model, units, choice, cfg, stats, batches, loss_fn)
    t3 = time.perf_counter()
    after = _param_counts(model, units.prefix)
    return build_report(cfg, old_shape, shape, before, after, choice, refits, passes,
                        {"statistics": t1 - t0, "choose": t2 - t1, "shrink": t3 - t2, "total": t3 - t0})  # fmt: skip
