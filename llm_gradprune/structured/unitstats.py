"""Per-unit calibration sums for structured importance and compensation, by forward and tensor hooks.

One accumulator (`UnitStats`) with the protocol of `calibration/stats.py` (attach/detach, tensors,
counters/load_counters, paused), so the one calibration loop (`calibration.loop.calibrate`) fills it,
its sums can be saved with `io.stats_files` and reduced like the others. Per layer, in fp32:

- forward: sums of x and x^2 of the consuming projections' inputs (down_proj: one entry per MLP channel;
  o_proj: per column of every head), and the sum over tokens of cos(h_in, h_out) of the block;
- backward (`backward=True`): the removal gradient z of every unit (see importance.py): per micro-batch
  z_b = sum_t z_t folded as sum z_b and sum z_b^2 (heads: z_b z_b^T, so a KV group's sum is exact), and
  per token sum z_t^2 (heads: z_t^T z_t). dL/dx of those inputs comes from a hook on each input tensor;
  the graph is built by making the embedding output require grad, so no weight gradient is computed.
"""

from __future__ import annotations

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

FORWARD = ("ch_x", "ch_x2", "hd_x", "hd_x2", "cos")
BACKWARD = ("ch_z", "ch_zz", "ch_tt", "hd_z", "hd_zz", "hd_tt", "blk_z", "blk_zz", "blk_tt")


class UnitStats:
    """fp32 per-unit sums of the given layers (keys `unit.<layer>.<sum>`), see the module docstring."""

    def __init__(
        self,
        layers: list[LayerUnits],
        shape: Shape,
        backward: bool = False,
        grad_root: nn.Module | None = None,
    ):
        self.layers = {lu.index: lu for lu in layers}
        self.shape = shape
        self.backward = backward
        self.grad_root = grad_root  # the embedding: its output is made to require grad
        I, H, hd = shape.intermediate, shape.heads, shape.head_dim  # noqa: E741
        sizes = {"ch_x": (I,), "ch_x2": (I,), "hd_x": (H * hd,), "hd_x2": (H * hd,), "cos": (1,),
                 "ch_z": (I,), "ch_zz": (I,), "ch_tt": (I,), "hd_z": (H,), "hd_zz": (H, H), "hd_tt": (H, H),
                 "blk_z": (1,), "blk_zz": (1,), "blk_tt": (1,)}  # fmt: skip
        names = FORWARD + (BACKWARD if backward else ())
        dev = {i: lu.modules["down"].weight.device for i, lu in self.layers.items()}
        self.sums = {
            f"unit.{i}.{s}": torch.zeros(sizes[s], dtype=torch.float32, device=dev[i])
            for i in self.layers
            for s in names
        }
        # tokens seen by each forward sum; micro-batches and tokens seen by each backward sum
        self.tokens = {f"{i}.{part}": 0 for i in self.layers for part in ("ch", "hd", "blk")}
        self.grad_batches = (
            {f"{i}.{part}": 0 for i in self.layers for part in ("ch", "hd", "blk")} if backward else {}
        )
        self.grad_tokens = dict(self.grad_batches)
        self._handles: list = []
        self.paused = False

    # -- the accumulator protocol ------------------------------------------------------------------
    def attach(self) -> UnitStats:
        for i, lu in self.layers.items():
            self._handles.append(lu.modules["down"].register_forward_hook(self._input_hook(i, "ch")))
            self._handles.append(lu.modules["o"].register_forward_hook(self._input_hook(i, "hd")))
            self._handles.append(lu.block.register_forward_hook(self._block_hook(i), with_kwargs=True))
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
        def hook(module, inputs, output) -> None:
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
        """One layer's sums as means (importance.UnitMeans)."""
        s = {k.split(".", 2)[2]: v for k, v in self.sums.items() if k.startswith(f"unit.{i}.")}
        n = {part: self.tokens[f"{i}.{part}"] for part in ("ch", "hd", "blk")}
        if min(n.values()) == 0:
            raise RuntimeError(f"no calibration tokens reached layer {i}: no unit statistics")
        out = UnitMeans(cos=float(s["cos"]) / n["blk"])
        for part in ("ch", "hd"):
            mean = s[f"{part}_x"] / n[part]
            setattr(out, f"{part}_mean", mean)
            setattr(out, f"{part}_var", (s[f"{part}_x2"] / n[part] - mean.square()).clamp_min(0))
        if self.backward:
            for part in ("ch", "hd", "blk"):
                b, t = self.grad_batches[f"{i}.{part}"], self.grad_tokens[f"{i}.{part}"]
                if b == 0:
                    raise RuntimeError(f"no gradient reached layer {i}: no removal gradients")
                z, zz, tt = s[f"{part}_z"] / b, s[f"{part}_zz"] / b, s[f"{part}_tt"] / t
                if part == "blk":
                    z, zz, tt = float(z), float(zz), float(tt)
                setattr(out, f"{part}_z", z)
                setattr(out, f"{part}_zz", zz)
                setattr(out, f"{part}_tt", tt)
        return out


def _require_grad(module, inputs, output):
    """Make the embedding output a leaf that requires grad: the graph then reaches every unit's input."""
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def consumers(layers: list[LayerUnits]) -> dict[str, nn.Module]:
    """The projections whose inputs a refit reads: o_proj and down_proj of each layer."""
    return {lu.full(r): lu.modules[r] for lu in layers for r in ("o", "down")}


def gather_unit_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    layers: list[LayerUnits],
    shape: Shape,
    *,
    backward: bool = True,
    hessians: bool = False,
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
    unit = UnitStats(layers, shape, backward=backward, grad_root=model.get_input_embeddings())
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
