"""Which weights are pruned: a filter over the model's matrices, no per-architecture code.

A target is one matrix a decoder block multiplies hidden states by, seen with rows = output channels:

- an `nn.Linear` weight (or a Conv kernel, for small CNNs);
- a GPT-2 style `Conv1D` weight, stored [in, out]: the target is its transpose, a view, so the
  checkpoint keeps Conv1D's own layout;
- one expert of a fused expert parameter (transformers 5 stores a layer's experts as 3-D parameters,
  `experts.gate_up_proj [E, 2I, H]`): expert e is the view `param[e]` (or its transpose where the
  experts class declares `is_transposed`), named `<experts>.<e>.<param>`, e.g.
  `model.layers.3.mlp.experts.5.gate_up_proj`.

Default: every such matrix inside the model's repeated blocks, i.e. the largest `nn.ModuleList` whose
children all share one class (a decoder's layers). Embeddings, norms and the LM head are outside it;
a weight shared with an input embedding (tied `lm_head`) is refused even when a pattern asks for it,
and a grouped (depthwise) convolution's kernel, as in state-space layers, is no matrix.
Routers and gates that choose or weigh experts are never targets, whatever their class: inside an
MoE layer (the module holding the experts) a matrix outside the experts whose output width is the
number of experts or 1 (`mlp.gate`, `shared_expert_gate`, `router`). Models without a block list (a
small CNN) target every Linear/Conv. `include` patterns, when given, replace the block restriction;
`exclude` patterns always apply. Patterns are regexes searched in the target's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
KINDS = ("attention", "mlp", "experts", "shared_experts", "other")


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


@dataclass(eq=False)
class Target:
    """One pruned matrix: where it lives and how it is seen as [out, in]."""

    name: str  # what include/exclude patterns see
    module: nn.Module  # the module holding the parameter (a Linear, a Conv1D, an experts module)
    param_name: str  # the attribute: "weight", "gate_up_proj"
    tensor_name: str  # the parameter's full name, its key in the checkpoint files
    kind: str = "other"  # one of KINDS (for the report)
    expert: int | None = None  # the expert's index in a fused parameter
    transposed: bool = False  # stored [in, out] (Conv1D, transposed experts)
    hooks: list = field(default_factory=list, repr=False)

    @property
    def key(self) -> str:
        """The name statistics, masks and the report use: the weight's name for a module's weight, the
        target's own name for an expert matrix (no tensor of that name exists)."""
        return self.name if self.expert is not None else self.tensor_name

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def linear(self) -> bool:
        """Is the matrix applied to the last dimension of its input (so activation statistics apply)?"""
        return self.expert is not None or self.transposed or isinstance(self.module, nn.Linear)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The [out, in] view of a tensor shaped like the parameter (the weight, its gradient, a mask)."""
        if self.expert is not None:
            t = t[self.expert]
        return t.T if self.transposed else t

    @property
    def weight(self) -> torch.Tensor:
        """The live matrix: the Parameter itself for a Linear, a view into it otherwise."""
        return self.matrix(self.param)

    def register_forward_hook(self, hook):
        """hook(target, (x,), y) for every call of this matrix: x its input rows, y its output."""
        if self.expert is None:
            return self.module.register_forward_hook(lambda m, inputs, output: hook(self, inputs, output))
        from .expert_calls import watch

        return watch(self, hook)


def as_targets(model: nn.Module, targets: dict) -> dict[str, Target]:
    """Targets given as {name: module} (the library API) become Target objects; Targets pass through."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for name, t in targets.items():
        out[name] = t if isinstance(t, Target) else _module_target(names.get(id(t), name), t, "other")
    return out


def _module_target(name: str, module: nn.Module, kind: str) -> Target:
    transposed = isinstance(module, _conv1d_class())
    return Target(name, module, "weight", f"{name}.weight", kind, transposed=transposed)


def block_list_prefix(model: nn.Module) -> str | None:
    """Dotted name of the largest ModuleList of same-class children (the decoder layers), if any; a
    list inside another such list (a layer's experts as separate modules) is never the block list."""
    lists = [
        (name, len(m)) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1
    ]  # fmt: skip
    # a one-layer decoder still has its block list: else the head would become a target
    outer = [(n, k) for n, k in lists if not any(n.startswith(o + ".") for o, _ in lists)]
    best, best_len = None, 0
    for name, length in outer:
        if length > best_len:
            best, best_len = name, length
    return best


def _fused_params(module: nn.Module) -> list[str]:
    """The module's own 3-D parameters: fused experts, one [E, ., .] matrix stack each (a convolution's
    kernel is 3-D too, and is no expert)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def _experts_layout(name: str, module: nn.Module, hidden: int | None) -> bool:
    """Is the module's fused stack stored [E, in, out]? transformers' experts interface declares it
    (`is_transposed`); otherwise the first stack's input is the hidden size (checked again when the
    experts first run: `expert_calls.probe_experts`)."""
    transposed = getattr(module, "is_transposed", None)
    if transposed is not None:
        return bool(transposed)
    first = getattr(module, _fused_params(module)[0]).shape
    if hidden is not None and (first[1] == hidden) != (first[2] == hidden):
        return first[1] == hidden
    raise ConfigError(
        f"{name} ({type(module).__name__}) holds fused expert weights [E, {first[1]}, {first[2]}] without "
        "declaring their layout (transformers' is_transposed): which side is the input cannot be told"
    )


@dataclass
class MoeLayer:
    """An MoE layer: the module holding the experts, how many, and its routers (never pruned)."""

    name: str
    experts: str  # the experts container (fused module or ModuleList)
    count: int
    routers: list[str] = field(default_factory=list)


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """Every MoE layer of the model: experts as fused 3-D parameters, or a ModuleList named `experts`."""
    modules = dict(model.named_modules())
    layers = []
    for name, module in modules.items():
        count, fused = None, _fused_params(module)
        if fused:
            count = getattr(module, fused[0]).shape[0]
        elif isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "experts" and len(module) > 1:
            count = len(module)
        if count is None or "." not in name:
            continue
        parent = name.rsplit(".", 1)[0]
        layers.append(MoeLayer(parent, name, count, _routers(modules[parent], parent, name, count)))
    return layers


def _routers(layer: nn.Module, layer_name: str, experts: str, count: int) -> list[str]:
    """Matrices of an MoE layer outside its experts whose output width is the expert count or 1."""
    out = []
    for pname, p in layer.named_parameters():
        full = f"{layer_name}.{pname}"
        if full.startswith(experts + ".") or p.dim() != 2:
            continue
        if p.shape[0] in (count, 1) and pname.rsplit(".", 1)[-1] == "weight":
            out.append(full)
    return out


def _kind(name: str, prefix: str | None, moe: list[MoeLayer]) -> str:
    for layer in moe:
        if name.startswith(layer.experts + "."):
            return "experts"
        if name.startswith(layer.name + "."):
            return "shared_experts"
    rest = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name
    if re.search(r"attn|attention|mixer|mamba", rest):
        return "attention"  # also linear attention and state-space layers: the block's token mixer
    if moe and re.search(r"shared", rest):
        return "shared_experts"  # a shared expert beside the MoE layer rather than inside it
    if re.search(r"mlp|ffn|feed_forward|moe|(^|\.)fc\d|dense_h_to_4h|dense_4h_to_h", rest):
        return "mlp"
    return "other"


def all_matrices(model: nn.Module) -> tuple[list[Target], list[str]]:
    """(every candidate matrix in model order, the routers' weight names), before any pattern."""
    prefix = block_list_prefix(model)
    moe = moe_layers(model)
    routers = {r for layer in moe for r in layer.routers}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: list[Target] = []
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    hidden = getattr(getattr(getattr(model, "config", None), "text_config", None), "hidden_size", hidden)
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE + _conv1d_class()):
            if id(module.weight) in embeddings or f"{name}.weight" in routers:
                continue
            if getattr(module, "groups", 1) > 1:
                continue  # a grouped (depthwise) convolution's kernel mixes no channels: no matrix to prune
            found.append(_module_target(name, module, _kind(name, prefix, moe)))
        for pname in _fused_params(module):
            transposed = _experts_layout(name, module, hidden)
            for e in range(getattr(module, pname).shape[0]):
                found.append(Target(f"{name}.{e}.{pname}", module, pname, f"{name}.{pname}",
                                    _kind(f"{name}.{e}", prefix, moe), e, transposed))  # fmt: skip
    return found, sorted(routers)


def find_targets(model: nn.Module, include: list[str] = (), exclude: list[str] = ()) -> dict[str, Target]:
    """Ordered {target name: Target} of the matrices pruned."""
    for pattern in [*include, *exclude]:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"target pattern {pattern!r} is not a valid regex: {err}") from None
    prefix = None if include else block_list_prefix(model)
    targets: dict[str, Target] = {}
    candidates, _ = all_matrices(model)
    for t in candidates:
        if prefix is not None and not t.name.startswith(prefix + "."):
            continue
        if include and not any(re.search(p, t.name) for p in include):
            continue
        if any(re.search(p, t.name) for p in exclude):
            continue
        targets[t.name] = t
    if not targets:
        raise ConfigError(
            f"target patterns match no prunable matrix (include={list(include)}, exclude={list(exclude)}); "
            "targets are Linear, Conv1D and fused expert matrices inside the decoder blocks, never routers, "
            "embeddings or the head"
        )
    return targets


def check_views_supported(targets: dict[str, Target], rows_sharded: bool) -> None:
    """Row shards (FSDP2) split a parameter's first dimension: the rows of a Linear weight, but the
    experts of a fused parameter and the inputs of a Conv1D, so those are refused there."""
    if not rows_sharded:
        return
    other = next((t for t in targets.values() if t.expert is not None or t.transposed), None)
    if other is not None:
        what = "a fused expert matrix" if other.expert is not None else "a Conv1D matrix"
        raise ConfigError(
            f"{other.name} is {what}: FSDP row shards split its parameter along another dimension than its "
            "rows; prune this model with one process or replicated processes"
        )


def target_params(targets: dict[str, Target]) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} holding the targets (a fused expert parameter once)."""
    return {t.tensor_name: t.param for t in targets.values()}


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
