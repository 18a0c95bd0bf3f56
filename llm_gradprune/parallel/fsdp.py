"""Row-sharded models (FSDP2): sharding a model, and gathering its pruned weights for saving.

FSDP2 (`torch.distributed.fsdp.fully_shard`, or Accelerate with `fsdp_version: 2`) splits every weight
by rows: rank r holds a contiguous block of output rows as the local part of a DTensor. Pruning such a
model is the whole-model executor with the `parallel.RowShards` collective: every rank passes all
micro-batches, each runs its piece of every one, folds its rows of every gradient, scores its rows and
selects with thresholds from all-reduced histograms; no rank gathers another's scores or weights.
`full_state_dict` gathers the pruned weights on the main process for saving.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..targets import block_list_prefix
from . import world


def fully_shard_model(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Shard with torch FSDP2 directly: each decoder layer, then the root (what Accelerate does on GPUs).

    Used where Accelerate does not offer FSDP itself (CPU processes over gloo).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    mesh = init_device_mesh(device.type, (world()[1],))
    model.to(device)
    prefix = block_list_prefix(model)
    if prefix is not None:
        for layer in model.get_submodule(prefix):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: nn.Module, accelerator=None) -> dict[str, torch.Tensor]:
    """The whole (pruned) state dict on the main process, on the CPU; {} on the others. Collective."""
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        sd = accelerator.get_state_dict(model) or {}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(model, options=opts)
    # A tied weight (lm_head = embeddings) comes back as two separate tensors; keep the first name
    # only, as save_pretrained does for an unsharded model, so the files match a 1-process run.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in sd:
            del sd[name]
        first.setdefault(id(p), name)
    return sd


def prepare_fsdp2(model: nn.Module, accelerator) -> nn.Module:
    """Accelerate's own FSDP2 sharding of `model` (its wrap policy, mesh and settings).

    Accelerate 1.15 refuses `prepare(model)` alone under FSDP2 ("a model and optimizer must be passed
    together"): it is given a plain SGD with lr 0 that is never stepped and holds no state.
    """
    unused = torch.optim.SGD([p for p in model.parameters()], lr=0.0)
    model, _ = accelerator.prepare(model, unused)
    return model


def uses_fsdp(fsdp: bool, accelerator) -> bool:
    """Shard the model: Accelerate configured for FSDP, or asked for (cfg.fsdp), with several processes.

    On CPU processes Accelerate ignores an FSDP launch config (it sets ACCELERATE_USE_FSDP but gives
    MULTI_CPU + DDP semantics); the launch config is honoured here by sharding with torch itself.
    """
    import os

    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    launched_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return (bool(fsdp) or launched_fsdp) and accelerator.num_processes > 1


def shard_model(model: nn.Module, accelerator, device) -> nn.Module:
    """Shard with Accelerate's FSDP2 where it offers it (accelerators), else with torch (CPU processes)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"fsdp_version {version} flattens weights across ranks: set fsdp_version: 2 in the "
                "accelerate config (row sharding)"
            )
        return prepare_fsdp2(model.to(device), accelerator)
    return fully_shard_model(model, device)
