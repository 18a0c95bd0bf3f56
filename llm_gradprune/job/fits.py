"""Will the run fit the memory free here? The memory model (`memory.py`) applied to a run's settings and
a meta-device skeleton of its model, when the run is planned, before its model is loaded (and by
`--dry-run`, which prints the same prediction)."""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import memory
from ..calibration.stats import STATISTICS
from ..config import JobConfig
from ..plan import Plan, make_plan
from ..targets import find_targets
from .meta_model import meta_model, model_shape, read_config


def available_memory(device: torch.device) -> tuple[float, float | None]:
    """(host bytes available, device bytes free; None for a CPU device: its memory is the host's)."""
    try:
        import psutil

        host = float(psutil.virtual_memory().available)
    except ImportError:  # accelerate brings psutil; a bare install reads the free pages
        host = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if device.type == "cuda":
        return host, float(torch.cuda.mem_get_info(device)[0])
    return host, None


def run_settings(cfg: JobConfig, plan: Plan, processes: int, sharded: bool, device: torch.device):
    """The memory model's settings of this run (per process)."""
    p = cfg.prune
    whole = [STATISTICS.get(s) for s in plan.whole_stats]
    return memory.RunSettings(
        dtype_bytes=torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size(),
        samples=cfg.num_samples, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        layer_wise=plan.executor == "layer_wise",
        weight_stats=sum(s.source in ("grad", "token") for s in whole),
        channel_stats=sum(s.source == "act" for s in whole),
        backward=any(s.backward for s in whole), stats_on_host=p.stats_device == "cpu", grad_accum=p.grad_accum,
        gradient_checkpointing=p.gradient_checkpointing, offload_inputs=bool(p.offload_inputs),
        input_copies=1 + (p.block_steps > 0) + (p.block_steps > 0 and p.block_target == "dense"
                                                and p.sequential_inputs),
        true_sequential=p.true_sequential, processes=processes, fsdp=sharded,
        math_attention=device.type == "cpu", device_is_host=device.type == "cpu",
    )  # fmt: skip


def statistics_plan(cfg: JobConfig, matrix: nn.Linear) -> Plan:
    """The real run's plan of statistics, update and executor: `make_plan` on one stand-in matrix (what
    it gathers depends on the settings, not on the model; its experts' probe needs real weights)."""
    return make_plan(nn.ModuleDict({"probe": matrix}), cfg.prune, targets={"probe": matrix})


def check_memory(
    cfg: JobConfig, shape: memory.ModelShape, plan: Plan, processes: int, sharded: bool, device: torch.device
) -> memory.Prediction:
    """The prediction of this run in its offload mode; ConfigError (one line) where it cannot fit here."""
    host, free = available_memory(device)
    settings = run_settings(cfg, plan, processes, sharded, device)
    return memory.check_fits(shape, settings, cfg.offload, host, free)


def check_run_fits(cfg: JobConfig, sharded: bool, processes: int, device: torch.device) -> None:
    """When a real run is planned, before its model is loaded: the memory model's prediction for its
    offload mode against the memory free here, from the config and a meta-device skeleton only;
    ConfigError (one line, naming the option that would fit) where it cannot fit."""
    from types import SimpleNamespace

    from ..plan import split_statistics

    config, _ = read_config(cfg.model, cfg.trust_remote_code)
    model = meta_model(config, cfg.dtype, cfg.trust_remote_code, name=cfg.model)
    targets = find_targets(model, cfg.prune.include, cfg.prune.exclude)
    shape = model_shape(model, targets, cfg.model)
    layer_wise = cfg.prune.layer_wise  # with fsdp: after the whole-model statistics on row shards
    # what run_settings reads of a plan, without make_plan (it would log the run's notes a second time)
    plan = SimpleNamespace(whole_stats=split_statistics(cfg.prune, layer_wise)[0],
                           executor="layer_wise" if layer_wise else "whole_model")  # fmt: skip
    check_memory(cfg, shape, plan, processes, sharded, device)
