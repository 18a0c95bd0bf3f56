"""Forward hooks on one expert of a fused expert parameter.

A fused experts module multiplies each expert's routed tokens by a slice of a 3-D parameter inside
its own forward (`linear(x, gate_up_proj[e])`, or `x @ gate_up_proj[e]` for transposed layouts). No
module exists per expert to hook, so while a watched experts module runs, a torch-function mode sees
those two calls: the index taken from a watched parameter names the expert, and the multiplication that
consumes that slice gives the expert's input rows (its routed tokens, as the expert sees them; for
`down_proj` the expert's own intermediate activations) and its output. The hooks then receive
(target, (x,), y) exactly as a module forward hook would, so every activation, Hessian and per-token
statistic works unchanged on experts.

While watched, the experts run their per-expert ("eager") implementation; other implementations (one
grouped matmul over all experts) compute the same outputs but take no per-expert slice.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_MATMULS = (torch.Tensor.matmul, torch.matmul, torch.Tensor.__matmul__)


class _Watch:
    """The hooks on one experts module: {(param name, expert): [(target, hook)]}."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.hooks: dict[tuple[str, int], list] = {}
        self.params: dict[int, str] = {}
        self.handles: list = []
        self.saved_impl = None

    def attach(self) -> None:
        self.handles = [
            self.module.register_forward_pre_hook(self._enter),
            self.module.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module, args):
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            self.saved_impl = config._experts_implementation
            config._experts_implementation = "eager"
        self.params = {id(getattr(module, p)): p for p, _ in self.hooks}
        self.mode = _ExpertMode(self)
        self.mode.__enter__()

    def _exit(self, module, args, output):
        mode, self.mode = getattr(self, "mode", None), None
        if mode is not None:
            mode.__exit__(None, None, None)
        config = getattr(module, "config", None)
        if self.saved_impl is not None:
            config._experts_implementation = self.saved_impl
            self.saved_impl = None

    def fire(self, pname: str, expert: int, x: torch.Tensor, y: torch.Tensor, transposed: bool) -> None:
        if _QUIET[0]:
            return
        for target, hook in self.hooks.get((pname, expert), ()):
            if target.transposed != transposed:
                raise RuntimeError(
                    f"{target.name}: the experts use their weights as {'[in, out]' if transposed else '[out, in]'}, "
                    "not as their class declares"
                )
            hook(target, (x,), y)


class _ExpertMode(TorchFunctionMode):
    def __init__(self, watch: _Watch):
        super().__init__()
        self.watch = watch
        self.slices: dict[int, tuple[torch.Tensor, str, int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.bmm and len(args) > 1 and id(args[1]) in self.watch.params:
            return self._per_expert_bmm(args[0], args[1], self.watch.params[id(args[1])])
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.watch.params:
            index = args[1]
            if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
                # the slice object is kept so its id cannot be reused while it is looked up
                self.slices[id(out)] = (out, self.watch.params[id(args[0])], int(index))
        elif (func is F.linear or func in _MATMULS) and len(args) > 1 and id(args[1]) in self.slices:
            _, pname, expert = self.slices[id(args[1])]
            self.watch.fire(pname, expert, args[0], out, transposed=func is not F.linear)
        return out

    def _per_expert_bmm(self, x: torch.Tensor, stack: torch.Tensor, pname: str) -> torch.Tensor:
        """`bmm(x [E, T, in], stack [E, in, out])` runs every token through every expert, the tokens
        the router did not send to an expert zeroed (Llama 4). Redone expert by expert on its nonzero
        rows, so that each expert's hooks see its routed tokens and an output that autograd reaches."""
        rows = [x[e].ne(0).any(-1).nonzero().squeeze(-1) for e in range(x.shape[0])]
        per = [x[e].index_select(0, r) @ stack[e] for e, r in enumerate(rows)]
        full = torch.stack([
            torch.zeros(x.shape[1], stack.shape[-1], dtype=y.dtype, device=y.device).index_add(0, r, y)
            for r, y in zip(rows, per, strict=True)
        ])  # fmt: skip
        for e, r in enumerate(rows):
            self.watch.fire(pname, e, x[e].index_select(0, r), per[e], transposed=True)
        return full


_WATCHES: dict[int, _Watch] = {}
_QUIET = [0]


@contextmanager
def unwatched():
    """Inside: expert calls fire no hook (a statistic's own extra calls of an experts module)."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


def watch(target, hook) -> _Handle:
    """Call hook(target, (x,), y) whenever `target`'s expert runs; the handle's remove() stops it."""
    w = _WATCHES.get(id(target.module))
    if w is None:
        w = _WATCHES[id(target.module)] = _Watch(target.module)
        w.attach()
    entry = (target, hook)
    w.hooks.setdefault((target.param_name, target.expert), []).append(entry)

    def remove() -> None:
        entries = w.hooks.get((target.param_name, target.expert), [])
        if entry in entries:
            entries.remove(entry)
        if not any(w.hooks.values()) and _WATCHES.get(id(target.module)) is w:
            for h in w.handles:
                h.remove()
            del _WATCHES[id(target.module)]

    return _Handle(remove)


class _Handle:
    """What `watch` returns: remove() unhooks, as a module hook's handle does."""

    def __init__(self, remove):
        self.remove = remove


@torch.no_grad()
def probe_experts(model: nn.Module, targets: dict, tokens: int = 8) -> None:
    """Before any calibration: one short forward must show every fused experts module taking per-expert
    slices in the declared layout; an implementation that does not (one batched matmul over all
    experts) is refused here rather than calibrated into empty statistics."""
    from .errors import ConfigError

    experts = [t for t in targets.values() if t.expert is not None]
    if not experts:
        return
    seen: set[int] = set()
    handles = [t.register_forward_hook(lambda t, i, o: seen.add(id(t.module))) for t in experts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        model(input_ids=torch.arange(tokens, device=device).unsqueeze(0) % 2)
    except RuntimeError as err:
        raise ConfigError(f"the experts' layout does not match how they run: {err}") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    silent = next((t for t in experts if id(t.module) not in seen), None)
    if silent is not None:
        raise ConfigError(
            f"{silent.name}: {type(silent.module).__name__} runs its experts without a per-expert call "
            "(e.g. one batched matmul), so their statistics cannot be gathered expert by expert"
        )
