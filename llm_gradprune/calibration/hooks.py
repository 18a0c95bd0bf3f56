"""Accumulators fed by forward hooks on Linear modules: attach and detach once, here."""

from __future__ import annotations

from torch import nn


def reads_rows(module) -> bool:
    """Does the module (or target) multiply the last dimension of its input by its weight matrix?
    A Linear, a Conv1D or an expert matrix does; a Conv2d kernel does not (no per-channel statistic)."""
    return isinstance(module, nn.Linear) or bool(getattr(module, "linear", False))


class ForwardHooked:
    """Base of an accumulator with one forward hook per module in `self.modules` (`_make_hook(name)`
    returns it); `_forget()` drops what a subclass holds only while attached."""

    modules: dict[str, nn.Module]

    def attach(self):
        self._handles = getattr(self, "_handles", [])
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        self._forget()

    def _make_hook(self, name: str):
        raise NotImplementedError

    def _forget(self) -> None:
        pass
