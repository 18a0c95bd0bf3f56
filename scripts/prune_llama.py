"""Prune a Llama-family causal LM with gradient statistics.

    accelerate launch scripts/prune_llama.py --config configs/quickstart.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/prune_llama.py --config configs/quickstart.yaml

Takes exactly the flags of `llm-gradprune prune` (see --help); this file only forwards to it.
"""

import sys

from llm_gradprune.commands import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
