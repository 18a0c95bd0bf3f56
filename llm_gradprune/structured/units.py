"""The removable units of a decoder, found through `named_modules()`, the targets and the config.

The decoder layers are the largest list of same-class blocks (`targets.block_list_prefix`). In each,
the units are read from the matrices a block multiplies hidden states by (`targets.all_matrices`):

- attention: q/k/v/o projections by their leaf names, or a fused `qkv_proj` (Phi3) split into its q, k
  and v rows; a query head is head_dim rows of q and head_dim columns of o, a KV group its k and v rows;
- MLP channels: every gated MLP of the block, `gate_proj`/`up_proj`/`down_proj` or a fused
  `gate_up_proj` (gate rows first), and each expert of a fused experts module (its `gate_up_proj[e]`,
  `down_proj[e]`); a channel is a row of gate and up and a column of down. MLPs of one width (the
  dense MLP, the routed experts, a shared expert) form a group named by the config key of that width,
  and every member of a group keeps the same number of channels;
- experts: the routed experts of each MoE layer, with the router rows that score them.

Widths must be the same in every layer (the saved config holds one of each); a model whose layers
differ (dense and MoE layers mixed), or whose blocks hold other kinds of projection, is refused in one
line naming what is missing. Shapes come from the config and are checked against the weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..targets import Target, all_matrices, block_list_prefix, moe_layers
from .importance import ATTENTION, MLP_ROLES, Geometry

LEAF = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "qkv_proj": ("q", "k", "v"),
        "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",), "gate_up_proj": ("gate", "up")}  # fmt: skip
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
DENSE_WIDTH, EXPERT_WIDTH, SHARED_WIDTH = (
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
NEEDS = "q/k/v/o (or qkv) attention projections and gated gate/up/down (or gate_up) MLPs in every layer"


@dataclass(frozen=True)
class Part:
    """Rows [start, start + size) of one matrix: a role inside a fused projection, or all of it."""

    target: Target
    start: int = 0
    size: int | None = None

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This part's rows of an [out, in] tensor shaped like the target's matrix."""
        return t if self.size is None else t[self.start : self.start + self.size]

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(self.target.weight)


@dataclass
class Mlp:
    """One gated MLP: channel j is row j of gate and up and column j of down."""

    name: str  # inside the block: "mlp", "mlp.shared_expert", "mlp.experts.3"
    group: str  # config key of its width
    gate: Part
    up: Part
    down: Part
    expert: int | None = None

    def part(self, role: str) -> Part:
        return getattr(self, role)

    @property
    def width(self) -> int:
        return self.down.weight.shape[1]


@dataclass
class LayerExperts:
    """The routed experts of one MoE layer: the experts module and its routers (names inside the block)."""

    module: str
    count: int
    routers: list[str]


@dataclass
class LayerUnits:
    """One decoder block: its attention parts by role, its MLPs and its routed experts."""

    index: int
    name: str  # dotted name of the block
    block: nn.Module
    attn: dict[str, Part]
    mlps: list[Mlp]
    experts: LayerExperts | None = None

    def targets(self) -> dict[str, Target]:
        parts = [*self.attn.values(), *(m.part(r) for m in self.mlps for r in MLP_ROLES)]
        return {p.target.name: p.target for p in parts}

    def consumers(self) -> dict[str, Target]:
        """The matrices whose input columns lose units: o and every MLP's down."""
        out = {self.attn["o"].target.name: self.attn["o"].target}
        out |= {m.down.target.name: m.down.target for m in self.mlps}
        return out


@dataclass(frozen=True)
class Shape:
    """The shape of the decoder that structured pruning changes; the same in every layer."""

    layers: int
    hidden: int
    widths: tuple[tuple[str, int], ...]  # (config key, width) of each MLP group
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 0  # routed experts per MoE layer
    experts_key: str | None = None  # the config key of their count

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.heads, self.kv_heads, self.head_dim)

    @property
    def width(self) -> dict[str, int]:
        return dict(self.widths)

    def to_dict(self) -> dict[str, int]:
        out = {"num_hidden_layers": self.layers, "hidden_size": self.hidden, **self.width,
               "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim}  # fmt: skip
        if self.experts_key is not None:
            out[self.experts_key] = self.experts
        return out

    def but(self, **changes) -> Shape:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__} | changes
        return Shape(**values)


@dataclass(frozen=True)
class UnitCosts:
    """Parameters of one decoder layer: fixed ones, so many per channel of each MLP of a group, per
    query head, per KV head, and per routed expert beyond its channels (its router rows)."""

    fixed: int
    channel: dict[str, int]  # group -> parameters per channel of one member MLP
    query: int
    kv: int
    expert: int = 0
    expert_groups: tuple[str, ...] = ()  # groups with one member per routed expert
    members: dict[str, int] = field(default_factory=dict)  # the other groups' member count

    def layer(self, widths: dict[str, int], heads: int, kv_heads: int, experts: int = 0) -> int:
        total = self.fixed + heads * self.query + kv_heads * self.kv + experts * self.expert
        for group, per in self.channel.items():
            n = experts if group in self.expert_groups else self.members.get(group, 1)
            total += n * widths[group] * per
        return total


@dataclass
class ModelUnits:
    model: nn.Module
    prefix: str  # dotted name of the decoder layer list
    layers: list[LayerUnits]
    shape: Shape
    costs: UnitCosts

    def targets(self) -> dict[str, Target]:
        """Every unit matrix of every layer by name (the targets of per-weight statistics)."""
        return {n: t for lu in self.layers for n, t in lu.targets().items()}

    def decoder_params(self) -> int:
        s = self.shape
        return s.layers * self.costs.layer(s.width, s.heads, s.kv_heads, s.experts)


def find_units(model: nn.Module) -> ModelUnits:
    """The decoder layers, their units and shape; a model without them is refused in one line."""
    config = getattr(model, "config", None)
    prefix = block_list_prefix(model)
    if config is None or prefix is None:
        raise ConfigError(
            f"structured pruning needs a decoder's list of layers; {type(model).__name__} has none"
        )
    matrices, _ = all_matrices(model)
    moe = {m.name: m for m in moe_layers(model) if m.name.startswith(prefix + ".")}
    layers = [
        _layer(i, f"{prefix}.{i}", block, matrices, moe, model)
        for i, block in enumerate(model.get_submodule(prefix))
    ]
    shape = _shape(config, layers, prefix, model)
    return ModelUnits(model, prefix, layers, shape, _costs(layers[0], shape))


def _refuse(model: nn.Module, why: str) -> ConfigError:
    return ConfigError(f"structured pruning needs {NEEDS}; {type(model).__name__}: {why}")


def _layer(i: int, name: str, block: nn.Module, matrices: list[Target], moe: dict, model) -> LayerUnits:
    inside = [t for t in matrices if t.name.startswith(name + ".")]
    attn: dict[str, Target] = {}
    mlps: dict[str, dict[str, Target]] = {}
    for t in inside:
        local = t.name[len(name) + 1 :]
        leaf = t.param_name if t.expert is not None else local.rsplit(".", 1)[-1]
        roles = LEAF.get(leaf)
        if roles is None:
            raise _refuse(model, f"layer {i} has {local}, which is none of these")
        if roles[0] in ATTENTION:
            for r in roles:
                if r in attn:
                    raise _refuse(model, f"layer {i} has a second {r} projection ({local})")
                attn[r] = t
            continue
        owner = local.rsplit(".", 1)[0]  # the MLP: its module, or the expert (`mlp.experts.3`)
        for r in roles:
            mlps.setdefault(owner, {})[r] = t
    missing = [r for r in ATTENTION if r not in attn]
    if missing:
        raise _refuse(model, f"layer {i} has no {missing[0]} projection")
    layer_moe = next((m for n, m in moe.items() if n.startswith(name + ".")), None)
    units = LayerUnits(i, name, block, _attention_parts(attn, model), [])
    for owner, roles in mlps.items():
        units.mlps.append(_mlp(owner, roles, layer_moe, name, model, i))
    if layer_moe is not None:
        units.experts = LayerExperts(layer_moe.experts[len(name) + 1 :], layer_moe.count,
                                     [r[len(name) + 1 :] for r in layer_moe.routers])  # fmt: skip
        _check_experts(units, model)
    return units


def _check_experts(lu: LayerUnits, model) -> None:
    """The experts module must hold only the stacks the units slice and be called with the routing (the
    top-k experts and weights of each token): REAP and the removal gradient read both."""
    module = lu.block.get_submodule(lu.experts.module)
    used = {lu.mlps[i].part(r).target.param_name for i in range(len(lu.mlps)) if lu.mlps[i].expert is not None
            for r in MLP_ROLES}  # fmt: skip
    extra = [n for n, _ in module.named_parameters() if n not in used]
    if extra:
        raise _refuse(model, f"{lu.name}.{lu.experts.module} also holds {extra[0]}, which no channel slices")
    if len(inspect.signature(module.forward).parameters) < 3:
        raise _refuse(
            model, f"{type(module).__name__} is not called with each token's top-k experts and weights"
        )


def _attention_parts(attn: dict[str, Target], model) -> dict[str, Part]:
    """Parts by role; a fused qkv splits into q, k, v rows by the config's head counts."""
    if attn["q"] is not attn["k"]:
        return {r: Part(t) for r, t in attn.items()}
    config = model.config
    heads, kv, hd = _heads(config)
    q, k = heads * hd, kv * hd
    if attn["q"].weight.shape[0] != q + 2 * k:
        raise _refuse(
            model, f"{attn['q'].name} has {attn['q'].weight.shape[0]} rows, not q + k + v = {q + 2 * k}"
        )
    return {
        "q": Part(attn["q"], 0, q),
        "k": Part(attn["q"], q, k),
        "v": Part(attn["q"], q + k, k),
        "o": Part(attn["o"]),
    }


def _mlp(owner: str, roles: dict[str, Target], layer_moe, layer: str, model, i: int) -> Mlp:
    missing = [r for r in MLP_ROLES if r not in roles]
    if missing:
        raise _refuse(model, f"layer {i}'s {owner} has no {missing[0]} projection (not a gated MLP)")
    down = roles["down"]
    expert = down.expert
    if roles["gate"] is roles["up"]:
        rows = roles["gate"].weight.shape[0]
        if rows != 2 * down.weight.shape[1]:
            raise _refuse(model, f"{roles['gate'].name} has {rows} rows, not twice {down.name}'s inputs")
        gate, up = Part(roles["gate"], 0, rows // 2), Part(roles["gate"], rows // 2, rows // 2)
    else:
        gate, up = Part(roles["gate"]), Part(roles["up"])
    config = model.config
    if expert is not None:
        group = EXPERT_WIDTH if hasattr(config, EXPERT_WIDTH) else DENSE_WIDTH
    elif layer_moe is not None and f"{layer}.{owner}".startswith(layer_moe.name + "."):
        group = SHARED_WIDTH
    else:
        group = DENSE_WIDTH
    if not hasattr(config, group):
        raise _refuse(model, f"{type(config).__name__} has no {group} for the width of {layer}.{owner}")
    return Mlp(owner, group, gate, up, Part(down), expert)


def _heads(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _experts_key(config, count: int, model) -> str:
    own = config.to_dict()  # the key the config class itself saves, not an alias of it
    key = next((k for k in EXPERT_COUNT_KEYS if own.get(k) == count), None)
    if key is None:
        raise _refuse(model, f"its config names no expert count equal to the {count} experts per layer")
    return key


def _signature(lu: LayerUnits) -> tuple:
    return (tuple((m.group, m.width) for m in lu.mlps), None if lu.experts is None else lu.experts.count)


def _shape(config, layers: list[LayerUnits], prefix: str, model) -> Shape:
    heads, kv, head_dim = _heads(config)
    if config.num_hidden_layers != len(layers):
        raise ConfigError(
            f"config num_hidden_layers {config.num_hidden_layers} but {prefix} holds {len(layers)} layers"
        )
    first = _signature(layers[0])
    odd = next((lu for lu in layers if _signature(lu) != first), None)
    if odd is not None:
        raise _refuse(model, f"layer {odd.index}'s MLPs differ from layer 0's (dense and MoE layers mixed)")
    widths = tuple(dict.fromkeys((m.group, m.width) for m in layers[0].mlps))
    for key, width in widths:
        if getattr(config, key) != width:
            raise ConfigError(
                f"{prefix}.0's MLP is {width} channels wide, but config {key} is {getattr(config, key)}"
            )
    if len({k for k, _ in widths}) != len(widths):
        raise _refuse(model, f"MLPs of one config width differ in size: {widths}")
    count = layers[0].experts.count if layers[0].experts is not None else 0
    key = _experts_key(config, count, model) if count else None
    shape = Shape(len(layers), config.hidden_size, widths, heads, kv, head_dim, count, key)
    want = {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim}
    for lu in layers:
        for role, rows in want.items():
            got = lu.attn[role].weight.shape[0]
            if got != rows:
                raise ConfigError(
                    f"{lu.attn[role].target.name} has {got} {role} rows, not {rows} as the config's head counts say"
                )
        if lu.attn["o"].weight.shape[1] != heads * head_dim:
            raise ConfigError(
                f"{lu.attn['o'].target.name} reads {lu.attn['o'].weight.shape[1]} columns, not {heads * head_dim}"
            )
    if heads % kv:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return shape


def _bias(part: Part, rows: bool) -> int:
    """Bias entries per unit row of a Linear part (a fused expert stack has none here)."""
    module = part.target.module
    return 1 if rows and part.target.expert is None and getattr(module, "bias", None) is not None else 0


def _costs(lu: LayerUnits, shape: Shape) -> UnitCosts:
    hd = shape.head_dim
    a = lu.attn
    channel: dict[str, int] = {}
    members: dict[str, int] = {}
    for m in lu.mlps:
        per = m.gate.weight.shape[1] + _bias(m.gate, True) + m.up.weight.shape[1] + _bias(m.up, True)
        channel[m.group] = per + m.down.weight.shape[0]
        members[m.group] = members.get(m.group, 0) + 1
    query = hd * (a["q"].weight.shape[1] + _bias(a["q"], True)) + hd * a["o"].weight.shape[0]
    kv = hd * (a["k"].weight.shape[1] + _bias(a["k"], True)) + hd * (
        a["v"].weight.shape[1] + _bias(a["v"], True)
    )
    expert_groups = tuple(sorted({m.group for m in lu.mlps if m.expert is not None}))
    expert = 0
    if lu.experts is not None:
        expert = sum(lu.block.get_submodule(r.rsplit(".", 1)[0]).weight.shape[1] for r in lu.experts.routers
                     if lu.block.get_parameter(r).shape[0] == lu.experts.count)  # fmt: skip
        expert += _expert_extra(lu)
    total = sum(p.numel() for p in lu.block.parameters())
    others = {g: n for g, n in members.items() if g not in expert_groups}
    costs = UnitCosts(0, channel, query, kv, expert, expert_groups, others)
    fixed = total - costs.layer(shape.width, shape.heads, shape.kv_heads, shape.experts)
    return UnitCosts(fixed, channel, query, kv, expert, expert_groups, others)


def _expert_extra(lu: LayerUnits) -> int:
    """Per expert, the router parameters beyond its weight row: a router bias."""
    per = 0
    for r in lu.experts.routers:
        module = lu.block.get_submodule(r.rsplit(".", 1)[0])
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.shape[0] == lu.experts.count:
            per += 1
    return per


def new_config_values(config, shape: Shape, kept_layers: list[int]) -> dict:
    """Config values of the shrunk model: widths, head counts, head_dim (explicit: it no longer equals
    hidden / heads), the expert count and the per-layer list of attention types, if the config has one."""
    values = shape.to_dict()
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple):
        values["layer_types"] = [layer_types[i] for i in kept_layers]
    return values


def config_accepts(config, values: dict) -> str | None:
    """None if the model's own config class accepts these values (as from_pretrained would), else why not."""
    try:
        type(config).from_dict({**config.to_dict(), **values})
    except Exception as err:  # noqa: BLE001 - any refusal by the config class is the answer
        return (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
    return None


def head_options(config, shape: Shape, head_unit: str = "auto") -> list[tuple[int, int]]:
    """(KV heads kept, query heads kept per group) pairs the config class accepts, largest first.

    `group` keeps every group's query count, `query` every KV head; Llama's config also asks hidden_size
    to be a multiple of the head count, so only some counts exist."""
    out = []
    for kv in range(shape.kv_heads, 0, -1):
        for r in range(shape.heads // shape.kv_heads, 0, -1):
            if head_unit == "group" and r != shape.heads // shape.kv_heads:
                continue
            if head_unit == "query" and kv != shape.kv_heads:
                continue
            values = {"num_attention_heads": kv * r, "num_key_value_heads": kv, "head_dim": shape.head_dim}
            if (kv, r) == (shape.kv_heads, shape.heads // shape.kv_heads) or config_accepts(
                config, values
            ) is None:
                out.append((kv, r))
    return out


def check_heads(units: ModelUnits) -> None:
    """Removing heads slices only q/k/v rows and o columns: an attention module holding any other
    per-head tensor (a norm across all heads, attention sinks) is refused, since it would not follow."""
    s = units.shape
    per_head = {s.heads * s.head_dim, s.kv_heads * s.head_dim, s.heads, s.kv_heads} - {s.head_dim}
    for lu in units.layers:
        local = lu.attn["o"].target.name[len(lu.name) + 1 :]
        attention = lu.block.get_submodule(local.rsplit(".", 1)[0]) if "." in local else lu.block
        own = {id(p.target.param) for p in lu.attn.values()}
        own |= {
            id(p.target.module.bias)
            for p in lu.attn.values()
            if getattr(p.target.module, "bias", None) is not None
        }
        for name, p in attention.named_parameters():
            if id(p) not in own and set(p.shape) & per_head and attention is not lu.block:
                raise ConfigError(
                    f"structure heads cannot remove heads of {type(units.model).__name__}: {lu.name}'s {name} "
                    f"{tuple(p.shape)} is per head and would not follow; remove channels or layers instead"
                )
