"""Layer Hessians for reconstruction: per module, the fp32 sum of x x^T over its input tokens.

For a linear layer y = W x the layer-wise loss of a change dW over calibration inputs X [in, n] is
||dW X||^2, whose Hessian is H = 2 X X^T / n (in_features^2 x 4 bytes per layer).
"""

from __future__ import annotations

import torch
from torch import nn

from .hooks import ForwardHooked, reads_rows


class Hessians(ForwardHooked):
    """Per-module fp32 sums of x x^T over input tokens, fed by forward hooks.

    Modules that read the very same input tensor (q/k/v, gate/up) share one accumulator: the hook sees
    the identical tensor object and records the alias instead of doing the product again.
    """

    def __init__(self, modules: dict[str, nn.Module], device=None):
        self.modules = {n: m for n, m in modules.items() if reads_rows(m)}
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        for n, m in self.modules.items():
            if getattr(m, "expert", None) is not None:
                # an expert may get no token on one rank and some on another: every rank holds its sum
                cols = m.weight.shape[1]
                self.sums[n] = torch.zeros(cols, cols, dtype=torch.float32, device=device or m.weight.device)
                self.tokens[n] = 0
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles: list = []
        self.paused = False  # set during a backward pass: a recompute must not count twice

    def _forget(self) -> None:
        self._last = None

    def _make_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0]
            if self.paused or name in self.alias:
                return
            if self._last is not None and self._last[0] is x and self._last[1] != name:
                if name not in self.sums:  # first sight: same input as the previous module
                    self.alias[name] = self._last[1]
                    return
            self._last = (x, name)
            self.add(name, x)

        return hook

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if name not in self.sums:
            dev = self.device or x.device
            self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=dev)
            self.tokens[name] = 0
        acc = self.sums[name]
        x = x.to(device=acc.device, dtype=torch.float32)
        acc.addmm_(x.T, x)
        self.tokens[name] += x.shape[0]

    def owner(self, name: str) -> str:
        return self.alias.get(name, name)

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2 X X^T / n over all tokens seen by module `name` (a new tensor)."""
        key = self.owner(name)
        if self.tokens.get(key, 0) == 0:
            raise RuntimeError(f"no inputs were recorded for {name}: cannot build its Hessian")
        return self.sums[key] * (2.0 / self.tokens[key])

    # -- the accumulator protocol (stats.py) ---------------------------------------------------------
    def holds(self, stat: str) -> bool:
        return stat == "hessian"

    def mean(self, stat: str, name: str) -> torch.Tensor:
        """The `hessian` of a module, or of the module of weight `name`."""
        return self.hessian(name.removesuffix(".weight"))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"hessian.{n}": self.sums[n] for n in sorted(self.sums)}

    def counters(self) -> dict[str, dict[str, int]]:
        return {"hessian_tokens": {n: self.tokens[n] for n in sorted(self.tokens)}}

    def load_counters(self, values: dict[str, dict[str, int]]) -> None:
        self.tokens.update({n: int(v) for n, v in values["hessian_tokens"].items()})

    def nbytes(self, name: str) -> int:
        return self.sums[self.owner(name)].numel() * 4

    def free(self) -> None:
        self.sums.clear()
        self.tokens.clear()
        self.alias.clear()


def hessian_bytes(in_features: int) -> int:
    """fp32 bytes of one layer Hessian: in_features^2 x 4."""
    return in_features * in_features * 4
