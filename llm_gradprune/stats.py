"""Calibration statistics: fp32 accumulators fed by hooks.

A gradient "sample" is one micro-batch's gradient g_b of the mean loss over that micro-batch. For each
target weight we keep only the sums the chosen criterion reads:

    grad_sum     = sum_b g_b          (taylor)
    grad_abs_sum = sum_b |g_b|        (gradient)
    grad_sq_sum  = sum_b g_b^2        (fisher, gblm)

plus, per tensor, the number of batches folded in. Each gradient is folded in by a
post-accumulate-grad hook the moment autograd finishes it and is released right there, so a full set
of gradients never exists. Squares are taken after the cast to fp32: no half-precision underflow.

Activation statistics (`act_sq_sum`: per input channel, sum over tokens of x^2) come from forward
hooks on the same pass and are allocated only for criteria that read them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

GRAD_STATS = ("grad_sum", "grad_abs_sum", "grad_sq_sum")
ACT_STATS = ("act_sq_sum",)


class GradStats:
    """Per-weight fp32 gradient sums for the named parameters."""

    def __init__(self, params: dict[str, nn.Parameter], needs: set[str] | tuple[str, ...], device=None):
        unknown = set(needs) - set(GRAD_STATS)
        if unknown:
            raise ValueError(f"unknown gradient statistics {sorted(unknown)}: allowed {GRAD_STATS}")
        self.params = params
        self.needs = tuple(s for s in GRAD_STATS if s in needs)
        self.sums: dict[str, dict[str, torch.Tensor]] = {
            stat: {
                n: torch.zeros(p.shape, dtype=torch.float32, device=device or p.device)
                for n, p in params.items()
            }
            for stat in self.needs
        }
        self.counts = {n: 0 for n in params}
        self.skipped = {n: 0 for n in params}
        self._handles: list = []

    def attach(self) -> GradStats:
        for name, p in self.params.items():
            p.requires_grad_(True)
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self.params.values():
            p.grad = None
            p.requires_grad_(False)

    def _make_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None  # release the gradient at once
            self.fold(name, g)

        return hook

    def fold(self, name: str, g: torch.Tensor) -> None:
        """Add one micro-batch gradient of parameter `name` into the sums (or skip it if not finite)."""
        if not bool(torch.isfinite(g).all()):
            self.skipped[name] += 1
            if self.skipped[name] == 1:
                warnings.warn(f"non-finite gradient for {name}: batch skipped for this tensor", stacklevel=2)
            return
        target = self.sums[self.needs[0]][name] if self.needs else None
        g = g.to(device=target.device if target is not None else g.device, dtype=torch.float32)
        # Order matters: abs_ last because it overwrites g, which we own now.
        if "grad_sum" in self.sums:
            self.sums["grad_sum"][name].add_(g)
        if "grad_sq_sum" in self.sums:
            self.sums["grad_sq_sum"][name].addcmul_(g, g)
        if "grad_abs_sum" in self.sums:
            self.sums["grad_abs_sum"][name].add_(g.abs_())
        self.counts[name] += 1

    def mean(self, stat: str, name: str) -> torch.Tensor:
        n = self.counts[name]
        if n == 0:
            raise RuntimeError(f"no finite gradient was folded in for {name}: cannot average {stat}")
        return self.sums[stat][name] / n


class ActStats:
    """Per-input-channel fp32 sums of squared layer inputs over all tokens, via forward hooks."""

    def __init__(self, modules: dict[str, nn.Module], device=None):
        self.modules = modules
        self.sums = {
            n: torch.zeros(m.weight.shape[1], dtype=torch.float32, device=device or m.weight.device)
            for n, m in modules.items()
            if isinstance(m, nn.Linear)
        }
        self.tokens = {n: 0 for n in self.sums}
        self._handles: list = []

    def attach(self) -> ActStats:
        for name in self.sums:
            self._handles.append(self.modules[name].register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            acc = self.sums[name]
            acc.add_(x.to(device=acc.device, dtype=torch.float32).pow(2).sum(dim=0))
            self.tokens[name] += x.shape[0]

        return hook

    def mean_sq(self, name: str) -> torch.Tensor:
        """mean over tokens of x_j^2, per input channel j."""
        if self.tokens.get(name, 0) == 0:
            raise RuntimeError(f"no activations were recorded for {name}")
        return self.sums[name] / self.tokens[name]


class TokenGradStats:
    """Per-weight fp32 sums over tokens of the per-token gradient squared, (dL/dy_t,i * x_t,j)^2.

    The weight gradient of a Linear layer is a sum over tokens, g = sum_t d_t x_t^T; GradStats sees only
    that sum per micro-batch, where contributions of different tokens cancel. Summing the squares of
    the per-token terms instead gives the diagonal of the per-token empirical Fisher (Gauss-Newton)
    matrix, the curvature Optimal Brain Damage asks for. It costs one extra [out, T] x [T, in] matmul
    per layer and batch (as much as the weight gradient itself) and one fp32 tensor per weight.
    Filled by a forward hook that hooks the layer's output gradient, so it needs a backward pass.
    """

    def __init__(self, modules: dict[str, nn.Module], device=None):
        self.modules = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
        self.sums = {
            n: torch.zeros(m.weight.shape, dtype=torch.float32, device=device or m.weight.device)
            for n, m in self.modules.items()
        }
        self.tokens = {n: 0 for n in self.sums}
        self._handles: list = []

    def attach(self) -> TokenGradStats:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_grad(grad: torch.Tensor) -> None:
                acc = self.sums[name]
                d = grad.reshape(-1, grad.shape[-1]).to(device=acc.device, dtype=torch.float32)
                xx = x.reshape(-1, x.shape[-1]).to(device=acc.device, dtype=torch.float32)
                acc.addmm_(d.square().T, xx.square())
                self.tokens[name] += xx.shape[0]

            output.register_hook(on_grad)

        return hook

    def mean(self, name: str) -> torch.Tensor:
        if self.tokens.get(name, 0) == 0:
            raise RuntimeError(f"no output gradients were recorded for {name}")
        return self.sums[name] / self.tokens[name]
