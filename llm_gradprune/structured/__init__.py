"""Structured pruning: remove whole MLP channels, attention heads (GQA-aware) and decoder layers by
gradient importance, compensate by least squares, and keep a smaller dense model that stock
`AutoModelForCausalLM.from_pretrained` loads (a plain config with smaller widths, head counts, layers).

    report = shrink_(model, batches, StructureConfig(structure="mixed", target_params=0.75))
    save_structured(model, tokenizer, "out/small", report)
"""

from .config import StructureConfig
from .importance import IMPORTANCES
from .save import save_structured
from .shrink import shrink_
from .units import find_units
from .unitstats import UnitStats, gather_unit_statistics

__all__ = ["IMPORTANCES", "StructureConfig", "UnitStats", "find_units", "gather_unit_statistics", "save_structured",
           "shrink_"]  # fmt: skip
