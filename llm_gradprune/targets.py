"""Which weights are pruned: a filter over `named_modules()`, no per-architecture code.

Default: every Linear (or Conv) weight inside the model's repeated blocks, i.e. the largest
`nn.ModuleList` whose children all share one class (a decoder's layers). Embeddings, norms and the
LM head are outside it, so they are never touched; a weight shared with an input embedding (tied
`lm_head`) is refused even when a pattern asks for it. Models without such a list (a small CNN)
target every Linear/Conv. `include` patterns, when given, replace the block restriction;
`exclude` patterns always apply. Patterns are regexes searched in the dotted module name.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import ConfigError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def block_list_prefix(model: nn.Module) -> str | None:
    """Dotted name of the largest ModuleList of same-class children (the decoder layers), if any."""
    best, best_len = None, 1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            if len({type(child) for child in module}) == 1:
                best, best_len = name, len(module)
    return best


def find_targets(model: nn.Module, include: list[str] = (), exclude: list[str] = ()) -> dict[str, nn.Module]:
    """Ordered {module name: module} of the layers whose `.weight` is pruned."""
    for pattern in [*include, *exclude]:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"target pattern {pattern!r} is not a valid regex: {err}") from None
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    prefix = None if include else block_list_prefix(model)
    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE) or id(module.weight) in embeddings:
            continue
        if prefix is not None and not name.startswith(prefix + "."):
            continue
        if include and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        targets[name] = module
    if not targets:
        raise ConfigError(
            f"target patterns match no prunable weight (include={list(include)}, exclude={list(exclude)})"
        )
    return targets


def weight_rows(weight) -> tuple[int, int]:
    """(rows, row length) of a weight seen as a matrix: output channels x everything they read."""
    return weight.shape[0], weight[0].numel()


def check_nm_fits(params: dict, nm: tuple[int, int] | None) -> None:
    """An N:M pattern needs every target row length to divide by M; checked before any calibration."""
    if nm is None:
        return
    n, m = nm
    for name, w in params.items():
        cols = weight_rows(w)[1]
        if cols % m:
            raise ConfigError(
                f"pattern '{n}:{m}' does not fit {name}: its rows hold {cols} weights, not a multiple of {m}"
            )
