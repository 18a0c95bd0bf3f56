"""Two-process recovery (data-parallel, DDP through Accelerate), for tests/test_recovery.py:
accelerate launch --multi_gpu --num_processes 2 -m tests.recovery_worker OUT_DIR"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llm_gradprune.calibration.data import round_robin
from llm_gradprune.parallel import make_accelerator
from llm_gradprune.recovery.config import RecoverConfig
from llm_gradprune.recovery.trainer import recover_

from .test_recovery import pruned, train_batches, weights


def main(out: str) -> None:
    torch.set_num_threads(1)
    acc = make_accelerator()
    model = pruned()
    before = weights(model)
    mine = round_robin(train_batches(4), acc.process_index, acc.num_processes)
    model, _ = recover_(
        model, mine, RecoverConfig(steps=4, lr=3e-3, batch_size=4), accelerator=acc, progress=False
    )
    after = weights(model)
    zeros_kept = all(
        torch.equal(after[n][before[n] == 0], torch.zeros_like(after[n][before[n] == 0])) for n in after
    )
    flat = torch.cat([w.reshape(-1) for w in after.values()])
    gathered = [torch.zeros_like(flat) for _ in range(acc.num_processes)]
    dist.all_gather(gathered, flat)
    moved = sum(int((after[n] != before[n]).sum()) for n in after)
    if acc.is_main_process:
        torch.save({"zeros_kept": zeros_kept, "replicas_equal": torch.equal(gathered[0], gathered[1]), "moved": moved},
                   Path(out) / "result.pt")  # fmt: skip
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
