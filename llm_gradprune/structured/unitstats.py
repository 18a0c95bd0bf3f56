"""Per-unit calibration sums for structured importance and compensation, by forward and tensor hooks.

One accumulator (`UnitStats`) with the protocol of `calibration/stats.py` (attach/detach, tensors,
counters/load_counters, paused), so the one calibration loop (`calibration.loop.calibrate`) fills it,
its sums can be saved with `io.stats_files` and reduced like the others. Per layer, in fp32:

- forward: sums of x and x^2 of the consuming projections' inputs (each MLP's down_proj, an expert's
  through `expert_calls`: one entry per channel; o_proj: per column of every head), the sum over tokens
  of cos(h_in, h_out) of the block, and in an MoE layer the tokens routed to each expert (and, for
  REAP, the sum of router weight x output norm, from one extra one-expert call of the experts module);
- backward (`backward=True`): the removal gradient z of every unit (see importance.py): per micro-batch
  z_b = sum_t z_t folded as sum z_b and sum z_b^2 (heads: z_b z_b^T, so a KV group's sum is exact), and
  per token sum z_t^2 (heads: z_t^T z_t). dL/dx of those inputs comes from a hook on each input tensor;
  an expert's z is sum w dL/dw over its routing weights w (the hook is on the experts' weights input).
  The graph is built by making the embedding output require grad, so no weight gradient is computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.hessians import Hessians
from ..calibration.loop import LossFn, calibrate, causal_lm_loss
from ..calibration.stats import GradStats, Statistics
from .importance import UnitMeans
from .units import LayerUnits, Shape


def _parts(lu: LayerUnits) -> dict[str, int]:
    """The layer's input parts and their widths: `ch` (or `ch0`, `ch1`, ... with several MLPs) for each
    MLP's down_proj input, `hd` for o_proj's."""
    one = len(lu.mlps) == 1
    return {("ch" if one else f"ch{m}"): mlp.width for m, mlp in enumerate(lu.mlps)}


class UnitStats:
    """fp32 per-unit sums of the given layers (keys `unit.<layer>.<sum>`), see the module docstring."""

    def __init__(
        self,
        layers: list[LayerUnits],
        shape: Shape,
        backward: bool = False,
        grad_root: nn.Module | None = None,
        reap: bool = False,
    ):
        self.layers = {lu.index: lu for lu in layers}
        self.shape = shape
        self.backward = backward
        self.reap = reap
        self.grad_root = grad_root  # the embedding: its output is made to require grad
        H, hd, E = shape.heads, shape.head_dim, shape.experts  # noqa: N806
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.grad_batches: dict[str, int] = {}
        for i, lu in self.layers.items():
            dev = lu.attn["o"].weight.device
            sizes = {f"{p}_{s}": (w,) for p, w in _parts(lu).items() for s in ("x", "x2")}
            sizes |= {"hd_x": (H * hd,), "hd_x2": (H * hd,), "cos": (1,)}
            if backward:
                sizes |= {f"{p}_{s}": (w,) for p, w in _parts(lu).items() for s in ("z", "zz", "tt")}
                sizes |= {
                    "hd_z": (H,),
                    "hd_zz": (H, H),
                    "hd_tt": (H, H),
                    "blk_z": (1,),
                    "blk_zz": (1,),
                    "blk_tt": (1,),
                }
            if lu.experts is not None:
                sizes |= {"ex_n": (E,)} | ({"ex_reap": (E,)} if reap else {})
                sizes |= {f"ex_{s}": (E,) for s in ("z", "zz", "tt")} if backward else {}
            self.sums |= {
                f"unit.{i}.{k}": torch.zeros(v, dtype=torch.float32, device=dev) for k, v in sizes.items()
            }
            # tokens seen by each forward sum; micro-batches and tokens seen by each backward sum
            parts = [*_parts(lu), "hd", "blk", *(["ex"] if lu.experts is not None else [])]
            self.tokens |= {f"{i}.{p}": 0 for p in parts}
            if backward:
                self.grad_batches |= {f"{i}.{p}": 0 for p in parts}
        self.grad_tokens = dict(self.grad_batches)
        self._handles: list = []
        self.paused = False

    # -- the accumulator protocol ------------------------------------------------------------------
    def attach(self) -> UnitStats:
        for i, lu in self.layers.items():
            for part, mlp in zip(_parts(lu), lu.mlps, strict=True):
                self._handles.append(mlp.down.target.register_forward_hook(self._input_hook(i, part)))
            self._handles.append(lu.attn["o"].target.register_forward_hook(self._input_hook(i, "hd")))
            self._handles.append(lu.block.register_forward_hook(self._block_hook(i), with_kwargs=True))
            if lu.experts is not None:
                experts = lu.block.get_submodule(lu.experts.module)
                self._handles.append(
                    experts.register_forward_pre_hook(self._routing_hook(i), with_kwargs=True)
                )
        if self.backward and self.grad_root is not None:
            self._handles.append(self.grad_root.register_forward_hook(_require_grad))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.sums)

    def counters(self) -> dict[str, dict[str, int]]:
        out = {"unit_tokens": dict(self.tokens)}
        if self.backward:
            out |= {"unit_grad_batches": dict(self.grad_batches), "unit_grad_tokens": dict(self.grad_tokens)}
        return out

    def load_counters(self, values: dict[str, dict[str, int]]) -> None:
        self.tokens = {k: int(v) for k, v in values["unit_tokens"].items()}
        if self.backward:
            self.grad_batches = {k: int(v) for k, v in values["unit_grad_batches"].items()}
            self.grad_tokens = {k: int(v) for k, v in values["unit_grad_tokens"].items()}

    # -- hooks ------------------------------------------------------------------------------------
    def _input_hook(self, i: int, part: str):
        def hook(target, inputs, output) -> None:
            if self.paused:
                return
            x = inputs[0]
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            self.sums[f"unit.{i}.{part}_x"].add_(flat.sum(dim=0))
            self.sums[f"unit.{i}.{part}_x2"].add_(flat.square().sum(dim=0))
            self.tokens[f"{i}.{part}"] += flat.shape[0]
            if self.backward and x.requires_grad:
                x.register_hook(
                    lambda g, flat=flat: self._fold(i, part, flat * g.reshape(flat.shape).float())
                )

        return hook

    def _block_hook(self, i: int):
        def hook(module, args, kwargs, output) -> None:
            if self.paused:
                return
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple | list) else output
            a = h_in.detach().reshape(-1, h_in.shape[-1]).to(torch.float32)
            b = h_out.detach().reshape(-1, h_out.shape[-1]).to(torch.float32)
            self.sums[f"unit.{i}.cos"].add_(F.cosine_similarity(a, b, dim=-1).sum())
            self.tokens[f"{i}.blk"] += a.shape[0]
            if self.backward and h_out.requires_grad:
                delta = b - a
                h_out.register_hook(lambda g, d=delta: self._fold(i, "blk", d * g.reshape(d.shape).float()))

        return hook

    def _routing_hook(self, i: int):
        """On each call of the experts module: each expert's routed count; with `reap`, its router weight
        times the norm of its own output per routed token; with `backward`, the removal gradient of each
        expert, z = sum over its (token, slot) of w dL/dw (w scales the expert's output)."""

        def hook(module, args, kwargs) -> None:
            if self.paused:
                return
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            hidden, index, weights = list(bound.values())[:3]
            E = self.shape.experts  # noqa: N806
            self.sums[f"unit.{i}.ex_n"].add_(torch.bincount(index.reshape(-1), minlength=E)[:E].float())
            self.tokens[f"{i}.ex"] += index.shape[0]
            if self.reap:
                self.sums[f"unit.{i}.ex_reap"].add_(_reap_sums(module, hidden, index, weights, E))
            if self.backward and weights.requires_grad:
                w, idx = weights.detach(), index.detach()
                weights.register_hook(
                    lambda g: self._fold(i, "ex", _scatter_experts(w.float() * g.float(), idx, E))
                )

        return hook

    def _fold(self, i: int, part: str, xg: torch.Tensor) -> None:
        """xg [tokens, columns] = x * dL/dx: sum it into each unit's z per token, then fold."""
        s = self.sums
        if part == "hd":
            z = xg.reshape(xg.shape[0], self.shape.heads, self.shape.head_dim).sum(dim=2)
        elif part == "blk":
            z = xg.sum(dim=1, keepdim=True)
        else:
            z = xg
        zb = z.sum(dim=0)
        s[f"unit.{i}.{part}_z"].add_(zb)
        if part == "hd":
            s[f"unit.{i}.hd_zz"].add_(torch.outer(zb, zb))
            s[f"unit.{i}.hd_tt"].add_(z.T @ z)
        else:
            s[f"unit.{i}.{part}_zz"].add_(zb.square())
            s[f"unit.{i}.{part}_tt"].add_(z.square().sum(dim=0))
        self.grad_batches[f"{i}.{part}"] += 1
        self.grad_tokens[f"{i}.{part}"] += z.shape[0]

    # -- means ------------------------------------------------------------------------------------
    def means(self, i: int) -> UnitMeans:
        """One layer's sums as means (importance.UnitMeans). An expert no token reached has zero means."""
        s = {k.split(".", 2)[2]: v for k, v in self.sums.items() if k.startswith(f"unit.{i}.")}
        lu = self.layers[i]
        n = {p: self.tokens[f"{i}.{p}"] for p in ("hd", "blk")}
        if min(n.values()) == 0:
            raise RuntimeError(f"no calibration tokens reached layer {i}: no unit statistics")
        out = UnitMeans(cos=float(s["cos"]) / n["blk"], ch_mean=[], ch_var=[])
        out.hd_mean, out.hd_var = _moments(s["hd_x"], s["hd_x2"], n["hd"])
        for part in _parts(lu):
            mean, var = _moments(s[f"{part}_x"], s[f"{part}_x2"], self.tokens[f"{i}.{part}"])
            out.ch_mean.append(mean)
            out.ch_var.append(var)
        if lu.experts is not None:
            out.ex_freq = s["ex_n"] / max(self.tokens[f"{i}.ex"], 1)
            if self.reap:
                out.ex_reap = s["ex_reap"] / s["ex_n"].clamp_min(1)
        if self.backward:
            self._gradient_means(i, s, out)
        return out

    def _gradient_means(self, i: int, s: dict, out: UnitMeans) -> None:
        lu = self.layers[i]
        for part in ("hd", "blk"):
            if self.grad_batches[f"{i}.{part}"] == 0:
                raise RuntimeError(f"no gradient reached layer {i}: no removal gradients")
        out.ch_z, out.ch_zz, out.ch_tt = [], [], []
        parts = [*_parts(lu), "hd", "blk", *(["ex"] if lu.experts is not None else [])]
        # every part over the layer's micro-batches and tokens, so an expert's z is its share of the
        # layer's loss change (a batch none of whose tokens reach an expert adds z_b = 0)
        b, t = self.grad_batches[f"{i}.hd"], self.grad_tokens[f"{i}.hd"]
        for part in parts:
            z, zz, tt = s[f"{part}_z"] / b, s[f"{part}_zz"] / b, s[f"{part}_tt"] / t
            if part == "blk":
                z, zz, tt = float(z), float(zz), float(tt)
            if part.startswith("ch"):
                out.ch_z.append(z)
                out.ch_zz.append(zz)
                out.ch_tt.append(tt)
            else:
                setattr(out, f"{part}_z", z)
                setattr(out, f"{part}_zz", zz)
                setattr(out, f"{part}_tt", tt)


def _moments(x: torch.Tensor, x2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) from sums over n tokens; zeros where no token came (an unrouted expert)."""
    if n == 0:
        return torch.zeros_like(x), torch.zeros_like(x)
    mean = x / n
    return mean, (x2 / n - mean.square()).clamp_min(0)


def _scatter_experts(values: torch.Tensor, index: torch.Tensor, experts: int) -> torch.Tensor:
    """[tokens, top_k] values per routing slot -> [tokens, experts], summed per expert."""
    out = torch.zeros(values.shape[0], experts + 1, dtype=values.dtype, device=values.device)
    out.scatter_add_(1, index.clamp(max=experts).long(), values)  # an index of E marks an empty slot
    return out[:, :experts]


@torch.no_grad()
def _reap_sums(module: nn.Module, hidden, index, weights, experts: int) -> torch.Tensor:
    """Per expert: the sum over its routed (token, slot) of router weight x ||expert output||. Each
    expert's output is computed apart by the module's own forward with a one-expert routing, outside
    every hook (`expert_calls.unwatched`), so no other statistic sees the extra calls."""
    from ..expert_calls import unwatched

    out = torch.zeros(experts, dtype=torch.float32, device=hidden.device)
    with unwatched():
        for e in range(experts):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            x = hidden.detach()[token]
            one = torch.full((x.shape[0], 1), e, dtype=index.dtype, device=index.device)
            y = module.forward(x, one, torch.ones(x.shape[0], 1, dtype=weights.dtype, device=x.device))
            w = weights.detach()[token, slot].float()
            out[e] = (w * y.float().norm(dim=-1)).sum()
    return out


def _require_grad(module, inputs, output):
    """Make the embedding output a leaf that requires grad: the graph then reaches every unit's input."""
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def consumers(layers: list[LayerUnits]) -> dict[str, nn.Module]:
    """The matrices whose inputs a refit reads: o_proj and every MLP's down_proj of each layer."""
    return {n: t for lu in layers for n, t in lu.consumers().items()}


def gather_unit_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    layers: list[LayerUnits],
    shape: Shape,
    *,
    backward: bool = True,
    hessians: bool = False,
    reap: bool = False,
    loss_fn: LossFn = causal_lm_loss,
    progress: bool = True,
) -> tuple[Statistics, dict[str, Any]]:
    """One pass of the calibration loop filling `UnitStats` (and, with `hessians`, the input Hessians of
    every o_proj and down_proj, for a refit on the dense model's inputs); (statistics, counters).

    The returned `Statistics` holds sources "unit" (and "hessian"); add them to a weight-statistics
    container with `stats.by_source.update(...)` to hand both to `shrink_`."""
    batches = list(batches)
    if not batches:
        raise ValueError("unit statistics need calibration batches, but none were given")
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    unit = UnitStats(layers, shape, backward=backward, grad_root=model.get_input_embeddings(), reap=reap)
    by_source: dict[str, Any] = {"unit": unit}
    if hessians:
        by_source["hessian"] = Hessians(consumers(layers))
    if backward:  # drives the backward pass; it holds no parameter, so no weight gradient is kept
        by_source["grad"] = GradStats({}, ())
    stats = Statistics(by_source)
    try:
        counters = calibrate(model, batches, stats, loss_fn=loss_fn, progress=progress, total=len(batches))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags[n])
    stats.by_source.pop("grad", None)
    stats.counters = counters
    return stats, counters
