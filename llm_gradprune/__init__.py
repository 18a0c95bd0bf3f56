"""llm-gradprune: prune Hugging Face causal LMs by gradient-based weight importance."""

__version__ = "0.1.0"

from .config import ConfigError, PruneConfig  # noqa: E402
from .pruner import PruneResult, prune_  # noqa: E402

__all__ = ["ConfigError", "PruneConfig", "PruneResult", "prune_", "__version__"]
