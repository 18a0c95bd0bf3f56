"""What a sparse run pruned and what it left, in words: the matrices and weights of each kind, the routers
and the rest left untouched, and for a mixture of experts how many calibration tokens each expert saw.

The model card and the `prune` summary read these, so both say the same thing. A report written before
the kinds were recorded has no `matrices`: the readers fall back to the totals.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from ..report import Sparsity

# the report's kinds in the order a block runs them, as a reader names them
KIND_LABELS = {"attention": "attention", "mlp": "MLP", "experts": "routed experts",
               "shared_experts": "shared experts", "other": "other"}  # fmt: skip
# as the card's first sentence names them: "the attention and routed-expert matrices"
ADJECTIVES = {"experts": "routed-expert", "shared_experts": "shared-expert"}
SHOWN_NAMES = 3


def kind_counts(sp: Sparsity) -> list[tuple[str, int, int]]:
    """(label, matrices, weights) per kind pruned, in block order; [] for a report without kinds."""
    per_kind = (sp.matrices or {}).get("per_kind") or {}
    return [
        (KIND_LABELS.get(k, k), per_kind[k]["matrices"], per_kind[k]["weights"]) for k in _ordered(per_kind)
    ]


def _ordered(per_kind: dict[str, Any]) -> list[str]:
    return [k for k in KIND_LABELS if k in per_kind] + [k for k in per_kind if k not in KIND_LABELS]


def short_names(names: list[str]) -> str:
    """Names in backticks; many are folded into patterns over their numbers (`model.layers.*.mlp.gate.weight`
    x 24), so a 64-layer model's routers still fit in a line."""
    if len(names) <= SHOWN_NAMES:
        return ", ".join(f"`{n}`" for n in names)
    folded: dict[str, int] = {}
    for n in names:
        key = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n)
        folded[key] = folded.get(key, 0) + 1
    return ", ".join(f"`{k}`" + (f" x {c}" if c > 1 else "") for k, c in folded.items())


def first_names(names: list[str]) -> str:
    """The first few names in backticks and how many more (each one matters: the report lists them all)."""
    shown = ", ".join(f"`{n}`" for n in names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def routed(sp: Sparsity) -> dict[str, int]:
    """{expert name: calibration tokens routed to it}; {} for a dense model or an older report."""
    return dict((sp.experts or {}).get("routed_tokens") or {})


def _in_layers(sp: Sparsity) -> str:
    """' in 2 MoE layers': the layers whose experts were routed tokens (each expert's name minus its index)."""
    layers = len({name.rsplit(".", 1)[0] for name in routed(sp)})
    return f" in {_plural(layers, 'MoE layer')}" if layers else ""


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def summary_counts(sp: Sparsity) -> str | None:
    """The kinds for the one-line summary, e.g. 'attention 8, routed experts 16 (8 experts in 2 MoE
    layers); 2 routers untouched'; None where a single kind and no router leave nothing to tell apart."""
    kinds = kind_counts(sp)
    routers = (sp.matrices or {}).get("routers") or []
    experts = (sp.matrices or {}).get("experts") or 0
    if len(kinds) < 2 and not experts and not routers:
        return None
    parts = []
    for label, matrices, _ in kinds:
        part = f"{label} {matrices}"
        if label == KIND_LABELS["experts"] and experts:
            part += f" ({_plural(experts, 'expert')}{_in_layers(sp)})"
        parts.append(part)
    text = ", ".join(parts)
    return text + (f"; {_plural(len(routers), 'router')} untouched" if routers else "")


def pruned_sentence(sp: Sparsity) -> str:
    """The card's first words on the zeros: how many, in which kinds of matrix, and what is untouched."""
    per_kind = (sp.matrices or {}).get("per_kind") or {}
    kinds = [ADJECTIVES.get(k, KIND_LABELS.get(k, k)) for k in _ordered(per_kind)]
    listed = ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else "".join(kinds)
    what = f"the {listed} matrices" if kinds else "the matrices of the decoder layers"
    untouched = "Routers, embeddings" if (sp.matrices or {}).get("routers") else "Embeddings"
    return (f"{sp.overall_sparsity:.2%} of the weights of its {sp.targets} target matrices ({sp.target_weights:,} "
            f"weights: {what}) are exactly zero. {untouched}, norms and the language-model head are untouched.")  # fmt: skip


def coverage_lines(sp: Sparsity) -> list[str]:
    """The card's section on what was pruned and what was not."""
    kinds = kind_counts(sp)
    if not kinds:  # an older report: its totals only
        return []
    lines = ["## What was pruned", "", "| kind | matrices | weights |", "|---|---|---|"]
    lines += [f"| {label} | {m} | {w:,} |" for label, m, w in kinds]
    if len(kinds) > 1:
        lines.append(f"| all | {sum(k[1] for k in kinds)} | {sum(k[2] for k in kinds):,} |")
    notes = [*expert_lines(sp), *untouched_lines(sp)]
    return [*lines, "", *notes, *([""] if notes else [])]


def expert_lines(sp: Sparsity) -> list[str]:
    """The experts pruned and the calibration tokens the router sent each of them."""
    n = (sp.matrices or {}).get("experts") or 0
    if not n:
        return []
    tokens = routed(sp)
    first = next(iter(tokens), None)
    example = next((name for name in sp.per_tensor if first and name.startswith(first + ".")), None)
    lines = [f"- Experts: {_plural(n, 'expert')}{_in_layers(sp)}, each of its matrices pruned as a matrix of its own"
             + (f" (one name per expert matrix, e.g. `{example}`)." if example else ".")]  # fmt: skip
    if tokens:
        counts = sorted(tokens.values())
        median = statistics.median(counts)  # a half when the count of experts is even
        lines.append(f"- Calibration tokens the router sent each expert: min {counts[0]:,}, median "
                     f"{median:,.{0 if median == int(median) else 1}f}, max {counts[-1]:,}.")  # fmt: skip
    unrouted = (sp.experts or {}).get("unrouted") or []
    if unrouted:
        rule = (sp.experts or {}).get("rule") or "no rule recorded"
        lines.append(f"- {_plural(len(unrouted), 'expert')} received no calibration token "
                     f"({first_names(unrouted)}): {rule}.")  # fmt: skip
    elif tokens:
        lines.append("- Every expert received calibration tokens.")
    return lines


def untouched_lines(sp: Sparsity) -> list[str]:
    """The routers and any matrix the target selection left out (the first sentence names the rest)."""
    m = sp.matrices or {}
    routers = m.get("routers") or []
    parts = []
    if routers:
        parts.append(f"{_plural(len(routers), 'router')} ({short_names(routers)}), never pruned: a router "
                     "chooses or weighs the experts")  # fmt: skip
    left = m.get("untargeted_matrices") or 0
    if left:
        parts.append(f"{_plural(left, 'other matrix', 'other matrices')} ({m.get('untargeted_weights', 0):,} "
                     "weights) the target selection left out: outside the decoder layers (an untied head) or "
                     "excluded by a pattern")  # fmt: skip
    return ["- Untouched: " + "; ".join(parts) + "."] if parts else []
