"""`prune --dry-run`: the plan of a run, checked as a real run checks it, without loading any weight.

The model is its config and its skeleton on the meta device (`meta_model.py`); the targets come from
`find_targets` on it, the statistics from `make_plan`, the memory from `memory.py` (one prediction per
offload mode), the time from a short probe: one decoder block of the model's shape with random weights,
run over one micro-batch on the run's device, and one solve of a target matrix, extrapolated to the run.

`check_memory` is the same memory check a real run makes when it is planned: it raises ConfigError (one
line naming the option that would make the run fit) when the predicted peaks exceed what is free here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import memory
from ..config import JobConfig
from ..errors import ConfigError
from ..plan import Plan, prune_tensor, solve_cost, target_summary
from ..targets import check_nm_fits, find_targets
from .fits import available_memory, run_settings, statistics_plan
from .meta_model import meta_model, model_shape, read_config, stored_bytes


@dataclass
class DryRun:
    """What `--dry-run` prints, and the one-line refusal of a run that cannot fit (or None)."""

    lines: list[str] = field(default_factory=list)
    refusal: str | None = None


# -- the time probe ----------------------------------------------------------------------------------
def _first_block_call(model: nn.Module, prefix: str, cfg: JobConfig):
    """The first block's (args, kwargs) for one micro-batch, recorded on the meta device."""
    from ..executors.blocks import capture_block_inputs

    ids = torch.zeros(cfg.batch_size, cfg.seq_len, dtype=torch.long, device="meta")
    block = model.get_submodule(prefix)[0]
    # a cache skips transformers' packed-sequence check, a value the meta device cannot give; the
    # recording drops the cache itself
    calls = capture_block_inputs(
        model, block, [ids], loss_fn=lambda m, b: m(input_ids=b, use_cache=True), device="meta"
    )
    return calls[0]


def _materialize(x: Any, device: torch.device) -> Any:
    """A meta tensor made real: random floats, ones for masks and indices (only the time matters)."""
    if isinstance(x, torch.Tensor) and x.is_meta:
        if x.is_floating_point():
            return torch.randn(x.shape, dtype=x.dtype, device=device) * 0.1
        return torch.ones(x.shape, dtype=x.dtype, device=device)
    if isinstance(x, tuple | list):
        return type(x)(_materialize(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _materialize(v, device) for k, v in x.items()}
    return x


def _random_block(model: nn.Module, prefix: str, device: torch.device) -> nn.Module:
    import copy

    block = copy.deepcopy(model.get_submodule(prefix)[0]).to_empty(device=device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        for b in block.buffers():
            b.zero_()
    return block.eval()


def _time(fn, repeats: int = 2) -> float:
    """Seconds of one call of `fn`: the mean of `repeats` after a warm-up (kernels, allocator), or the
    warm-up itself when it took over a second (the probe stays short on a slow device)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    if first > 1.0:
        return first
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


PROBE_SIDE = 4096  # the solve probe's largest side: a larger target is timed on a piece and scaled


class _Neutral:
    """Whole-model statistics of ones, for a probe solve whose criterion reads a prior."""

    def mean(self, stat: str, name: str) -> torch.Tensor:
        return torch.ones(1)


def _block_seconds(cfg: JobConfig, model: nn.Module, prefix: str, device: torch.device) -> float:
    """Seconds of one block's forward over one micro-batch (the block freed when done)."""
    call = _materialize(_first_block_call(model, prefix, cfg), device)
    block = _random_block(model, prefix, device)
    with torch.no_grad():
        return _time(lambda: block(*call[0], **call[1]))


def probe(cfg: JobConfig, model: nn.Module, shape: memory.ModelShape, prefix: str, device: torch.device):
    """(forward seconds of one block per micro-batch, solve seconds of the probed matrix, its (rows, cols),
    the stand-in plan); the block and matrix have random weights on `device`."""
    forward = _block_seconds(cfg, model, prefix, device)
    rows, cols = max(
        ((m.rows, m.cols) for b in shape.blocks for m in b.matrices), key=lambda rc: rc[0] * rc[1]
    )
    m = cfg.prune.nm[1] if cfg.prune.nm else 1
    rows, cols = min(rows, PROBE_SIDE), min(cols, PROBE_SIDE - PROBE_SIDE % m)
    matrix = nn.Linear(cols, rows, bias=False, device=device)
    plan = statistics_plan(cfg, matrix)
    x = torch.randn(cols, 2 * cols, device=device)
    hessian = x @ x.T / (2 * cols)
    dense = matrix.weight.detach().clone()

    # the global scope's counts become per-tensor budgets: each tensor then selects in its own scope
    scope = "tensor" if plan.cfg.scope == "global" else plan.cfg.scope or "row"

    def solve():
        matrix.weight.data.copy_(dense)
        prune_tensor(plan, "probe.weight", matrix.weight.data, plan.cfg.sparsity, scope,
                     lambda n: torch.rand(rows, cols, device=device), hessian, _Neutral())  # fmt: skip

    return forward, _time(solve, repeats=1), (rows, cols), plan


def time_estimate(cfg: JobConfig, shape: memory.ModelShape, settings: memory.RunSettings, measured) -> str:
    """The run's seconds extrapolated from the probe: blocks x passes x micro-batches x one forward (the
    block refit's passes included, and a block-local criterion's backward through each block as 3), the
    solves scaled by their cost, and a whole-model pass of 1 (forward) or 3 (backward) forwards."""
    forward, solve, (rows, cols), plan = measured
    calls = math.ceil(cfg.num_samples / cfg.batch_size / settings.processes)
    refit = _refit_passes(cfg.prune, math.ceil(cfg.num_samples / cfg.batch_size))
    unit = solve / solve_cost(plan, rows, cols)
    ref = shape.blocks[0].params or 1
    stats = calls * forward * (3 if settings.backward else 1) * sum(b.params for b in shape.blocks) / ref
    stats = stats if settings.whole_pass else 0.0
    layer = 0.0
    block_backward = 3 if plan.criterion.block_local else 0
    for b in shape.blocks if settings.layer_wise else ():
        stages = len({m.stage or m.reads for m in b.matrices})
        passes = 1 if not cfg.prune.sequential_inputs else (1 + stages if settings.true_sequential else 2)
        layer += ((passes + block_backward) * calls + refit) * forward * b.params / ref
        layer += sum(unit * solve_cost(plan, m.rows, m.cols) for m in b.matrices)
    if not settings.layer_wise:
        layer = sum(unit * solve_cost(plan, m.rows, m.cols) for b in shape.blocks for m in b.matrices)
    return (f"about {_duration(stats + layer)} (whole-model statistics {_duration(stats)}, pruning "
            f"{_duration(layer)}); probe on {_device_name()}: one block's forward over "
            f"{cfg.batch_size}x{cfg.seq_len} tokens {forward * 1e3:.1f} ms, one {rows}x{cols} solve "
            f"{solve * 1e3:.1f} ms; offload transfers not counted")  # fmt: skip


def _refit_passes(p, micro_batches: int) -> int:
    """Block forwards of the block refit per block: every rank runs it over every micro-batch, the dense
    outputs once, each step a forward and a backward (about 3 forwards), the loss after once and, with a
    step every `block_batch`, the loss before once."""
    if not p.block_steps:
        return 0
    before = 0 < p.block_batch < micro_batches
    return micro_batches * (1 + 3 * p.block_steps + 1 + before)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


# -- the plan ----------------------------------------------------------------------------------------
def checked(cfg: JobConfig):
    """The planning checks of a real run (`skeleton.checked_plan`) that write nothing and take no lock:
    (cfg, sharded, processes, device)."""
    from ..parallel import make_accelerator
    from .skeleton import checked_plan
    from .transforms import transform_for

    if cfg.structured is not None:
        raise ConfigError(
            "--dry-run plans unstructured pruning; structure has no plan to print yet: drop --dry-run"
        )
    transform = transform_for(cfg)
    cfg = transform.adjust(cfg)
    accelerator = make_accelerator(cpu=cfg.device == "cpu")
    sharded, _, _, device = checked_plan(cfg, transform, accelerator)
    return cfg, sharded, accelerator.num_processes, device


def dry_run(cfg: JobConfig) -> DryRun:
    """The plan of the run `cfg` describes, and its refusal if it cannot fit here; no weight is read."""
    from ..targets import block_list_prefix
    from .inputs import check_context
    from .transforms import check_targets

    cfg, sharded, processes, device = checked(cfg)
    config, path = read_config(cfg.model, cfg.trust_remote_code)
    model = meta_model(config, cfg.dtype, cfg.trust_remote_code)
    if cfg.needs_data:
        check_context(model, cfg.seq_len)
    p = cfg.prune
    check_targets(model, cfg, p.include, p.exclude, sharded=sharded)
    targets = find_targets(model, p.include, p.exclude)
    check_nm_fits({t.key: t.weight for t in targets.values()}, p.nm)
    shape = model_shape(model, targets, cfg.model)
    host, free = available_memory(device)
    block = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size() * shape.largest_block.params
    measured = None
    if 4 * block <= (free if free is not None else host):  # a short probe: a block well inside memory
        measured = probe(cfg, model, shape, block_list_prefix(model), device)
        plan = measured[3]
    else:
        m = p.nm[1] * 8 if p.nm else 64
        plan = statistics_plan(cfg, nn.Linear(m, m, bias=False, device="meta"))
    settings = run_settings(cfg, plan, processes, sharded, device)
    out = DryRun(describe(cfg, model, path, targets, plan, settings, device))
    out.lines += memory_lines(shape, settings, cfg.offload, host, free)
    out.lines.append(
        "time: " + (time_estimate(cfg, shape, settings, measured) if measured else
                    f"not probed (one block takes {memory.human(block)}, over a quarter of the free memory)")
    )  # fmt: skip
    try:
        memory.check_fits(shape, settings, cfg.offload, host, free)
        out.lines.append(
            f"fits: yes, with offload {cfg.offload} ({memory.FIT_SHARE:.0%} of the free memory at most)"
        )
    except ConfigError as err:
        out.refusal = str(err)
    return out


def describe(cfg: JobConfig, model, path: str, targets, plan: Plan, settings, device) -> list[str]:
    """The path, the targets per kind and the statistics, one line each."""
    p = cfg.prune
    stored = stored_bytes(path)
    on_disk = ", ".join(f"{k} {memory.human(v)}" for k, v in (stored or {}).items()) or "no local safetensors"
    params = sum({id(t): t.numel() for t in model.parameters()}.values())
    lines = [f"dry run of {cfg.model}: no weight is loaded, nothing is written",
             f"model: {path} ({type(model).__name__}, {params:,} parameters at {cfg.dtype}; weights stored: {on_disk})"]  # fmt: skip
    mode = plan.executor.replace("_", "-")
    if plan.executor == "layer_wise":
        mode += (
            ", true_sequential"
            if p.true_sequential
            else (", sequential" if p.sequential_inputs else ", not sequential")
        )
    lines.append(f"path: {mode}; criterion {p.criterion}, reconstruct {p.reconstruct}, allocation {p.allocation}, "
                 f"sparsity {p.sparsity:g}, pattern {p.pattern}, rounds {p.rounds}; offload {cfg.offload}; "
                 f"{settings.processes} process(es){', FSDP' if settings.fsdp else ''} on {device}")  # fmt: skip
    summary = target_summary(model, targets)
    kinds = ", ".join(
        f"{k} {v['matrices']} matrices ({v['weights']:,} weights)" for k, v in summary["per_kind"].items()
    )
    extra = f"; {summary['experts']} experts" if summary["experts"] else ""
    lines.append(
        f"targets: {kinds}{extra}; {len(summary['routers'])} routers, embeddings, norms and the head untouched"
    )
    whole = ", ".join(sorted(plan.whole_stats)) or "none"
    if plan.whole_stats:
        whole += (
            " (a backward pass over the whole model)"
            if settings.backward
            else " (a forward pass over the whole model)"
        )
    lines.append(
        f"statistics: whole model: {whole}; per block: {', '.join(sorted(plan.stage_stats)) or 'none'}"
    )
    return lines


def memory_lines(shape, settings, offload: str, host: float, free: float | None) -> list[str]:
    """Predicted peaks per offload mode, and what is free here."""
    where = (
        "host and device are one memory (a CPU run)" if free is None else f"device {memory.human(free)} free"
    )
    lines = [f"memory (predicted peaks per process; here: host {memory.human(host)} available, {where}):"]
    for mode in memory.OFFLOADS:
        if mode != "none" and not settings.layer_wise:
            lines.append(f"  offload {mode}: not available (offload applies to layer-wise runs)")
            continue
        pred = memory.predict(shape, settings, mode)
        mark = " <- this run" if mode == offload else ""
        device = "" if free is None else f"; device {pred.line('device')}"
        lines.append(f"  offload {mode}: host {pred.line('host')}{device}{mark}")
        lines += [f"    note: {n}" for n in pred.notes if mode == offload]
    return lines
