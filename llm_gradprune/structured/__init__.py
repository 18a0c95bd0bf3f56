"""Structured pruning: remove whole MLP channels, attention heads (GQA-aware) and decoder layers by
gradient importance, compensate by least squares, and keep a smaller dense model that stock
`AutoModelForCausalLM.from_pretrained` loads (a plain config with smaller widths, head counts, layers).

    report = shrink_(model, batches, StructureConfig(structure="mixed", target_params=0.75))
    save_structured(model, tokenizer, "out/small", report)
"""

from importlib import import_module

from .config import StructureConfig
from .importance import IMPORTANCES

# The configuration is read by the job's config (a low stage); the machinery, which reaches the
# calibration loop and the block executor, loads on first use so that import stays one-way.
_LAZY = {"save_structured": ".save", "shrink_": ".shrink", "find_units": ".units", "UnitStats": ".unitstats",
         "gather_unit_statistics": ".unitstats"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["IMPORTANCES", "StructureConfig", "UnitStats", "find_units", "gather_unit_statistics", "save_structured",
           "shrink_"]  # fmt: skip
