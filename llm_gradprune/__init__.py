"""llm-gradprune: prune Hugging Face causal LMs by gradient-based weight importance."""

__version__ = "0.2.0"

from .config import JobConfig, PruneConfig  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .executors import prune_  # noqa: E402
from .plan import PruneResult  # noqa: E402

__all__ = ["ConfigError", "JobConfig", "PruneConfig", "PruneResult", "prune_", "__version__"]
