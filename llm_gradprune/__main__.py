"""`python -m llm_gradprune` is the `llm-gradprune` command."""

import sys

from .commands import main

sys.exit(main())
