"""The removable units of a Llama-family model, found through `named_modules()` and its config.

The decoder layers are the largest list of same-class blocks (`targets.block_list_prefix`); inside each,
the seven projections are found by their leaf names (q/k/v/o_proj, gate/up/down_proj), the names every
Llama-family model in transformers uses. Llama, Mistral and Qwen2 (q/k/v bias) are supported; any other
model is refused with one line. Shapes come from the config and are checked against the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..targets import block_list_prefix
from .importance import ROLES, Geometry

SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
LEAF = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
        "down": "down_proj"}  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """The shape of the decoder that structured pruning changes; the same in every layer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.heads, self.kv_heads, self.head_dim)

    def to_dict(self) -> dict[str, int]:
        return {"num_hidden_layers": self.layers, "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim}  # fmt: skip


@dataclass
class LayerUnits:
    """One decoder block and its seven projections, by role (q, k, v, o, gate, up, down)."""

    index: int
    name: str  # dotted name of the block
    block: nn.Module
    local: dict[str, str]  # role -> name inside the block
    modules: dict[str, nn.Linear]  # role -> module

    def full(self, role: str) -> str:
        return f"{self.name}.{self.local[role]}"


@dataclass(frozen=True)
class UnitCosts:
    """Parameters of one decoder layer: fixed ones plus so many per channel, query head and KV head."""

    fixed: int
    channel: int
    query: int
    kv: int

    def layer(self, intermediate: int, heads: int, kv_heads: int) -> int:
        return self.fixed + intermediate * self.channel + heads * self.query + kv_heads * self.kv


@dataclass
class ModelUnits:
    model: nn.Module
    prefix: str  # dotted name of the decoder layer list
    layers: list[LayerUnits]
    shape: Shape
    costs: UnitCosts

    def modules(self) -> dict[str, nn.Module]:
        """Every projection of every layer by dotted name (the targets of per-weight statistics)."""
        return {lu.full(r): lu.modules[r] for lu in self.layers for r in ROLES}

    def decoder_params(self) -> int:
        return self.shape.layers * self.costs.layer(
            self.shape.intermediate, self.shape.heads, self.shape.kv_heads
        )


def _bias_numel(m: nn.Linear) -> int:
    return 0 if m.bias is None else 1


def find_units(model: nn.Module) -> ModelUnits:
    """The decoder layers, their projections and shape; a model outside the family is refused in one line."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"structured pruning supports {', '.join(SUPPORTED.values())} models; {type(model).__name__} "
            f"(model_type {model_type!r}) is not one"
        )
    prefix = block_list_prefix(model)
    if prefix is None:
        raise ConfigError(f"{type(model).__name__} has no list of decoder layers to shrink")
    layers = []
    for i, block in enumerate(model.get_submodule(prefix)):
        found: dict[str, str] = {}
        for name, module in block.named_modules():
            role = next((r for r, leaf in LEAF.items() if name.rsplit(".", 1)[-1] == leaf), None)
            if role is None:
                continue
            if role in found or not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"layer {prefix}.{i} has an unexpected {LEAF[role]} ({name}): cannot shrink it"
                )
            found[role] = name
        missing = [LEAF[r] for r in ROLES if r not in found]
        if missing:
            raise ConfigError(f"layer {prefix}.{i} has no {missing[0]}: cannot shrink it")
        mods = {r: block.get_submodule(n) for r, n in found.items()}
        layers.append(LayerUnits(i, f"{prefix}.{i}", block, found, mods))
    shape = _shape(config, layers, prefix)
    return ModelUnits(model, prefix, layers, shape, _costs(layers[0], shape))


def _shape(config, layers: list[LayerUnits], prefix: str) -> Shape:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = Shape(len(layers), config.hidden_size, config.intermediate_size, heads, kv, head_dim)
    if config.num_hidden_layers != len(layers):
        raise ConfigError(
            f"config num_hidden_layers {config.num_hidden_layers} but {prefix} holds {len(layers)} layers"
        )
    want = {"q": (heads * head_dim, shape.hidden), "k": (kv * head_dim, shape.hidden),
            "v": (kv * head_dim, shape.hidden), "o": (shape.hidden, heads * head_dim),
            "gate": (shape.intermediate, shape.hidden), "up": (shape.intermediate, shape.hidden),
            "down": (shape.hidden, shape.intermediate)}  # fmt: skip
    for lu in layers:
        for role, dims in want.items():
            got = tuple(lu.modules[role].weight.shape)
            if got != dims:
                raise ConfigError(
                    f"{lu.full(role)} has shape {got}, not {dims} as the config says: widths differ per layer"
                )
    if heads % kv:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return shape


def _costs(lu: LayerUnits, shape: Shape) -> UnitCosts:
    m = lu.modules
    hd = shape.head_dim
    channel = m["gate"].in_features + _bias_numel(m["gate"]) + m["up"].in_features + _bias_numel(m["up"])
    channel += m["down"].out_features
    query = hd * (m["q"].in_features + _bias_numel(m["q"])) + hd * m["o"].out_features
    kv = hd * (m["k"].in_features + _bias_numel(m["k"])) + hd * (m["v"].in_features + _bias_numel(m["v"]))
    total = sum(p.numel() for p in lu.block.parameters())
    fixed = total - shape.intermediate * channel - shape.heads * query - shape.kv_heads * kv
    return UnitCosts(fixed, channel, query, kv)


def new_config_values(config, shape: Shape, kept_layers: list[int]) -> dict:
    """Config values of the shrunk model: widths, head counts, head_dim (explicit: it no longer equals
    hidden / heads) and the per-layer list of attention types, if the config has one."""
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
