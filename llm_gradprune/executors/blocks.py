"""Running a model one decoder block at a time, for layer-wise mode, with no assumption on its blocks.

The calibration batches run through the model until the first block is called; a forward pre-hook
records that call's positional inputs and keyword arguments (hidden states, rotary embeddings,
attention mask, position ids, ...) and raises a sentinel to stop the forward. Nothing is assumed about
the block's signature; only a KV cache is dropped, since blocks are re-run. `call_stages` finds a
block's stages (modules reading one input: q/k/v, then o, gate/up, down) by watching one forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..calibration.loop import LossFn, causal_lm_loss, to_device
from ..errors import ConfigError


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _drop_cache(value: Any) -> Any:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return value
    return None if isinstance(value, Cache) else value


def _move(obj: Any, device: torch.device | str) -> Any:
    return to_device(obj, torch.device(device))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn = causal_lm_loss,
    device: torch.device | None = None,
    store: torch.device | str | None = None,
) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `first_block`'s call for every batch, moved to `store` (default: as they come)."""
    device = device or next(model.parameters()).device
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        kwargs = {k: _drop_cache(v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if store is not None:
            args, kwargs = _move(args, store), _move(kwargs, store)
        calls.append((tuple(args), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    if old_cache is not None:
        config.use_cache = False
    try:
        for batch in batches:
            try:
                loss_fn(model, to_device(batch, device))
            except _StopForward:
                continue
            raise RuntimeError("the model finished a forward pass without calling its first block")
    finally:
        handle.remove()
        if old_cache is not None:
            config.use_cache = old_cache
    return calls


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a recorded decoder-block call passes (first positional, or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.no_grad()
def run_block(
    block: nn.Module, calls: list[tuple[tuple, dict]], device: torch.device, keep_outputs: bool
) -> None:
    """Run every recorded call through `block`; with `keep_outputs`, its outputs replace the hidden states."""
    for i, (args, kwargs) in enumerate(calls):
        store = hidden_states_of(args, kwargs).device
        a, kw = _move(args, device), _move(kwargs, device)
        out = block(*a, **kw)
        if keep_outputs:
            h = out[0] if isinstance(out, tuple | list) else out
            calls[i] = _with_hidden(args, kwargs, h.to(store))


class _StageInputsSeen(Exception):
    """Raised by a hook to stop a block's forward once a stage's last module has read its input."""


def run_block_until(block: nn.Module, calls: list[tuple[tuple, dict]], device, module: nn.Module) -> None:
    """Run every recorded call through `block` only up to (and including) `module`; outputs are dropped."""

    def stop(*_):
        raise _StageInputsSeen

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                try:
                    block(*_move(args, device), **_move(kwargs, device))
                except _StageInputsSeen:
                    pass
    finally:
        handle.remove()


def call_stages(
    block: nn.Module, modules: dict[str, nn.Module], calls: list[tuple[tuple, dict]], device
) -> list[list[str]]:
    """The block's target modules in call order, grouped into stages of modules that read the very same
    input tensor (found by running `calls`, normally one sample, with recording hooks)."""
    stages: list[list[str]] = []
    last: list = [None]

    def make_hook(name: str):
        def hook(mod, inputs, output) -> None:
            if any(name in g for g in stages):
                return
            if last[0] is not None and inputs[0] is last[0] and stages:
                stages[-1].append(name)
            else:
                stages.append([name])
            last[0] = inputs[0]

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_block(block, calls, device, keep_outputs=False)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if not any(n in g for g in stages)]
    if missing:
        raise RuntimeError(f"true_sequential: target {missing[0]!r} was never called by its block")
    return stages


def split_by_block(targets: dict[str, nn.Module], prefix: str, n_blocks: int) -> list[dict[str, nn.Module]]:
    per: list[dict[str, nn.Module]] = [{} for _ in range(n_blocks)]
    for name, module in targets.items():
        rest = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None
        index = rest.split(".", 1)[0] if rest else None
        if index is None or not index.isdigit():
            raise ConfigError(
                f"target {name!r} is outside the block list {prefix!r}: layer-wise mode prunes block targets only"
            )
        per[int(index)][name] = module
    return per
