"""`StructureConfig`: what structured pruning removes, by which importance, and how it compensates.

Fields follow the project's convention (`fields._f(default, help, group)`), so the lead can put them in the
flat YAML and generate their flags. Validation happens once, here, with one-line `ConfigError`s; what
depends on the model (which head counts its config class accepts, whether it has bias flags) is
checked by `shrink_` before any weight changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..fields import _f
from .importance import FORMS, IMPORTANCES

STRUCTURES = ("channels", "heads", "layers", "mixed")
HEAD_UNITS = ("auto", "group", "query")
COMPENSATIONS = ("lsq", "none")
REFIT_INPUTS = ("sequential", "dense")
# which kinds of unit each structure may remove, and the keep ratio that sets each kind explicitly
KINDS = {"channels": ("channels",), "heads": ("heads",), "layers": ("layers",),
         "mixed": ("channels", "heads", "layers")}  # fmt: skip
KEEP_FIELDS = {"channels": "keep_channels", "heads": "keep_heads", "layers": "keep_layers"}


def _fraction(name: str, value: Any, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} {value!r} must be a number in (0, 1]")
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{name} {value!r} is outside (0, 1]")
    return float(value)


@dataclass
class StructureConfig:
    """Structured pruning: whole MLP channels, attention heads and decoder layers, saved as a smaller dense model."""

    structure: str = _f(
        "channels",
        "what is removed: channels (MLP intermediate channels), heads (attention heads, GQA-aware), layers "
        "(whole decoder layers) or mixed (all three, split by one ranking of estimated loss increase; "
        "channels and heads only with importance_form element)",
        "structure",
        choices=lambda: STRUCTURES,
    )
    target_params: float | None = _f(
        None,
        "fraction of the decoder layers' parameters kept, in (0, 1] (default 0.75 unless keep_* ratios "
        "are given); the result keeps at most this much, the nearest shape transformers loads",
        "structure",
    )
    keep_channels: float | None = _f(
        None,
        "fraction of MLP intermediate channels kept in every layer (instead of target_params)",
        "structure",
    )
    keep_heads: float | None = _f(
        None,
        "fraction of query heads kept in every layer (instead of target_params), rounded to the nearest "
        "head count the model's config class accepts",
        "structure",
    )
    keep_layers: float | None = _f(
        None, "fraction of decoder layers kept (instead of target_params)", "structure"
    )
    head_unit: str = _f(
        "auto",
        "attention unit with GQA: group (a whole KV group: its query heads and its k/v head), query (the "
        "same number of query heads inside every group) or auto (any mix, by importance)",
        "structure",
        choices=lambda: HEAD_UNITS,
    )
    importance: str = _f(
        "token_fisher", "importance of a unit (see structured.importance.IMPORTANCES)", "structure",
        choices=IMPORTANCES.names,
    )  # fmt: skip
    importance_form: str | None = _f(
        None,
        "for taylor, fisher and token_fisher: vector (the gradient of removing the unit as a whole, "
        "default) or element (per-weight statistics summed over the unit's weights)",
        "structure",
        choices=lambda: FORMS,
    )
    compensate: str = _f(
        "lsq",
        "after removing channels or heads, refit the consuming projection (down_proj, o_proj) by least "
        "squares on calibration inputs (lsq), or only slice (none)",
        "structure",
        choices=lambda: COMPENSATIONS,
    )
    refit_inputs: str = _f(
        "sequential",
        "calibration inputs of the refit: sequential (block by block, on the outputs of the already "
        "shrunk blocks; two block passes) or dense (the dense model's, from the statistics pass)",
        "structure",
        choices=lambda: REFIT_INPUTS,
    )
    mean_bias: bool = _f(
        False,
        "also add the removed units' mean contribution as a bias of the consuming projection (FLAP); "
        "needs a config with mlp_bias / attention_bias (Llama)",
        "structure",
    )
    refit_damp: float = _f(
        0.01, "damping of the refit's input second moment, as a fraction of its mean diagonal", "structure"
    )
    channel_multiple: int = _f(
        8, "kept MLP channels are a multiple of this (rounded towards removing more)", "structure"
    )

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ConfigError(
                f"structure {self.structure!r} is unknown: choose one of {', '.join(STRUCTURES)}"
            )
        if self.head_unit not in HEAD_UNITS:
            raise ConfigError(
                f"head_unit {self.head_unit!r} is unknown: choose one of {', '.join(HEAD_UNITS)}"
            )
        if self.compensate not in COMPENSATIONS:
            raise ConfigError(
                f"compensate {self.compensate!r} is unknown: choose one of {', '.join(COMPENSATIONS)}"
            )
        if self.refit_inputs not in REFIT_INPUTS:
            raise ConfigError(
                f"refit_inputs {self.refit_inputs!r} is unknown: choose one of {', '.join(REFIT_INPUTS)}"
            )
        imp = IMPORTANCES.get(self.importance)
        self.importance_form = imp.resolve_form(self.importance_form)
        keeps = {kind: getattr(self, f) for kind, f in KEEP_FIELDS.items() if getattr(self, f) is not None}
        for kind, value in keeps.items():
            setattr(self, KEEP_FIELDS[kind], _fraction(KEEP_FIELDS[kind], value))
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
        if not keeps:
            self.target_params = 0.75 if self.target_params is None else self.target_params
            self.target_params = _fraction("target_params", self.target_params)
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
        if self.head_unit != "auto" and "heads" not in KINDS[self.structure]:
            raise ConfigError(f"head_unit {self.head_unit!r} applies to structure heads or mixed only")
        if not isinstance(self.mean_bias, bool):
            raise ConfigError(f"mean_bias {self.mean_bias!r} must be true or false")
        if self.mean_bias and self.structure == "layers":
            raise ConfigError(
                "mean_bias compensates removed channels or heads; structure 'layers' removes neither"
            )
        if isinstance(self.refit_damp, bool) or not isinstance(self.refit_damp, int | float):
            raise ConfigError(f"refit_damp {self.refit_damp!r} must be a number in (0, 10]")
        if not 0.0 < float(self.refit_damp) <= 10.0:
            raise ConfigError(f"refit_damp {self.refit_damp!r} must be in (0, 10]")
        self.refit_damp = float(self.refit_damp)
        c = self.channel_multiple
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"channel_multiple {c!r} must be an integer >= 1")

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
