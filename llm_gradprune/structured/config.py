"""`StructureConfig`: what structured pruning removes, by which importance, and how it compensates.

Fields are settings (`fields.setting`), so they are flat YAML keys and flags of `prune` like any other;
types, choices and ranges are checked by `fields.validate`, the rules between fields here, all with
one-line `ConfigError`s; what
depends on the model (which head counts its config class accepts, whether it has bias flags) is
checked by `shrink_` before any weight changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..fields import setting, validate
from .importance import FORMS, IMPORTANCES

STRUCTURES = ("channels", "heads", "layers", "mixed", "experts")
HEAD_UNITS = ("auto", "group", "query")
COMPENSATIONS = ("lsq", "none")
REFIT_INPUTS = ("sequential", "dense")
# which kinds of unit each structure may remove, and the keep ratio that sets each kind explicitly
KINDS = {"channels": ("channels",), "heads": ("heads",), "layers": ("layers",),
         "mixed": ("channels", "heads", "layers"), "experts": ("experts",)}  # fmt: skip
KEEP_FIELDS = {
    "channels": "keep_channels",
    "heads": "keep_heads",
    "layers": "keep_layers",
    "experts": "keep_experts",
}


@dataclass
class StructureConfig:
    """Structured pruning: whole MLP channels, attention heads and decoder layers, saved as a smaller dense model."""

    structure: str = setting(
        "channels",
        "what is removed: channels (MLP intermediate channels; in an MoE, inside every expert and the shared "
        "expert), heads (attention heads, GQA-aware), layers (whole decoder layers), mixed (all three, split "
        "by one ranking of estimated loss increase; channels and heads only with importance_form element) "
        "or experts (whole routed experts of every MoE layer, the same number in each, with their router rows)",
        "structure",
        choices=STRUCTURES,
    )
    target_params: float | None = setting(
        None,
        "fraction of the decoder layers' parameters kept, in (0, 1] (default 0.75 unless keep_* ratios "
        "are given); the result keeps at most this much, the nearest shape transformers loads",
        "structure",
        range="(0, 1]",
    )
    keep_channels: float | None = setting(
        None, "fraction of MLP intermediate channels kept in every layer (instead of target_params)", "structure",
        range="(0, 1]")  # fmt: skip
    keep_heads: float | None = setting(
        None,
        "fraction of query heads kept in every layer (instead of target_params), rounded to the nearest "
        "head count the model's config class accepts",
        "structure",
        range="(0, 1]",
    )
    keep_layers: float | None = setting(
        None, "fraction of decoder layers kept (instead of target_params)", "structure", range="(0, 1]"
    )
    keep_experts: float | None = setting(
        None,
        "fraction of routed experts kept in every MoE layer (instead of target_params), rounded down; at "
        "least num_experts_per_tok",
        "structure",
        range="(0, 1]",
    )
    head_unit: str = setting(
        "auto",
        "attention unit with GQA: group (a whole KV group: its query heads and its k/v head), query (the "
        "same number of query heads inside every group) or auto (any mix, by importance)",
        "structure",
        choices=HEAD_UNITS,
        unless=(lambda s: "heads" in KINDS[s.structure], "applies to structure heads or mixed only"),
    )
    importance: str = setting(
        "token_fisher", "importance of a unit (see structured.importance.IMPORTANCES); experts also take "
        "reap (router-weighted output norm) and frequency (routed share)", "structure",
        choices=IMPORTANCES.names,
    )  # fmt: skip
    importance_form: str | None = setting(
        None,
        "for taylor, fisher and token_fisher: vector (the gradient of removing the unit as a whole, "
        "default) or element (per-weight statistics summed over the unit's weights)",
        "structure",
        choices=FORMS,
    )
    compensate: str = setting(
        "lsq",
        "after removing channels or heads, refit the consuming projection (down_proj, o_proj) by least "
        "squares on calibration inputs (lsq), or only slice (none)",
        "structure",
        choices=COMPENSATIONS,
    )
    refit_inputs: str = setting(
        "sequential",
        "calibration inputs of the refit: sequential (block by block, on the outputs of the already "
        "shrunk blocks; two block passes) or dense (the dense model's, from the statistics pass)",
        "structure",
        choices=REFIT_INPUTS,
    )
    mean_bias: bool = setting(
        False,
        "also add the removed units' mean contribution as a bias of the consuming projection (FLAP); "
        "needs a config with mlp_bias / attention_bias (Llama)",
        "structure",
    )
    refit_damp: float = setting(
        0.01,
        "damping of the refit's input second moment, as a fraction of its mean diagonal",
        "structure",
        range="(0, 10]",
    )
    channel_multiple: int = setting(
        8,
        "kept MLP channels are a multiple of this (rounded towards removing more)",
        "structure",
        range=">= 1",
    )

    def __post_init__(self) -> None:
        validate(self)
        imp = IMPORTANCES.get(self.importance)
        self.importance_form = imp.resolve_form(self.importance_form)
        keeps = self.explicit_keeps
        for kind in keeps:
            if kind not in KINDS[self.structure]:
                raise ConfigError(
                    f"{KEEP_FIELDS[kind]} sets the {kind} kept, but structure {self.structure!r} removes "
                    f"{' and '.join(KINDS[self.structure])} only"
                )
        if keeps and self.target_params is not None:
            raise ConfigError(
                f"target_params {self.target_params!r} conflicts with {', '.join(KEEP_FIELDS[k] for k in keeps)}: "
                "give one or the other"
            )
        if not keeps and self.target_params is None:
            self.target_params = 0.75
        if self.structure == "mixed" and not keeps and not imp.loss_scale:
            raise ConfigError(
                f"structure 'mixed' compares channels, heads and layers by estimated loss increase, which "
                f"importance {self.importance!r} does not give: use taylor, fisher or token_fisher, or keep_* ratios"
            )
        for kind in KINDS[self.structure] if not keeps else keeps:
            if (
                kind == "layers"
                and self.importance_form == "element"
                and (keeps or self.structure == "layers")
            ):
                raise ConfigError(
                    "importance_form 'element' ranks no layers: removing a layer is not the sum of its weights' "
                    "per-weight terms (on SmolLM2 at 25% it chose layers worth ppl > 1e5): use the vector form"
                )
            if not imp.supports(kind):
                raise ConfigError(
                    f"importance {self.importance!r} has no {kind} form: use one of "
                    f"{', '.join(n for n, i in IMPORTANCES.items() if i.supports(kind))}"
                )
        if self.mean_bias and self.structure in ("layers", "experts"):
            raise ConfigError(
                f"mean_bias compensates removed channels or heads; structure {self.structure!r} removes neither"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of unit this run may remove."""
        keeps = self.explicit_keeps
        if keeps:
            return tuple(keeps)
        if self.structure == "mixed" and self.importance_form == "element":
            return ("channels", "heads")  # element forms rank no layers (see __post_init__)
        return KINDS[self.structure]

    @property
    def explicit_keeps(self) -> dict[str, float]:
        return {kind: getattr(self, f) for kind, f in KEEP_FIELDS.items() if getattr(self, f) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
