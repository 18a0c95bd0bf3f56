"""What each command does between the two evaluations: the only part of a job that differs.

- `Prune`: calibrate and zero weights (`prune_`), or `rounds > 1` of it (`prune_in_rounds_`);
- `Shrink`: structured pruning, whole units removed (`shrink_`), a smaller dense model;
- `Keep`: nothing (`llm-gradprune recover`: a pruned folder in, recovery training is the point).

Each answers the same questions the skeleton asks: what to check when the run is planned, which text
to read, where the model goes, what the report holds, which model is the teacher's base.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..calibration.assets import resolve_model
from ..calibration.data import micro_batches, round_robin_chunks, token_hash
from ..config import JobConfig
from ..errors import ConfigError
from ..executors import prune_
from ..io.calib_state import CalibState, check_state_dir, resolve_state_dir, run_identity
from ..io.checkpoint import read_report, tensor_shapes_of
from ..io.hub import check_verifiable
from ..parallel.fsdp import shard_model, uses_fsdp
from ..plan import needs_whole_model
from ..recovery.trainer import check_lora_targets
from ..report import calibration_record
from ..rounds import prune_in_rounds_
from ..status import set_stage
from ..support import SupportQuery, check_support
from ..targets import block_list_prefix, check_views_supported, find_targets
from .inputs import calibration_samples, check_context, check_teacher, with_training_seq_len
from .preflight import weight_bytes
from .recovery import settings_identity


class Transform:
    """Defaults shared by the transforms; each overrides what it does differently."""

    given = "dense"  # what the model is before the transform (the first evaluation's name)
    result: str | None = "pruned"  # what it is after; None: the transform leaves it as it is
    keeps_report = False  # the report comes from the input folder (recover)

    def adjust(self, cfg: JobConfig) -> JobConfig:
        return cfg

    def check(self, cfg: JobConfig, accelerator) -> bool:
        """Transform-specific refusals when the run is planned; returns whether rows are sharded."""
        return False

    def check_outputs(self, cfg: JobConfig) -> None:
        pass

    def check_model(self, job) -> None:
        if job.cfg.needs_data:
            check_context(job.model, job.cfg.seq_len)
        check_targets(job.model, job.cfg, job.cfg.prune.include, job.cfg.prune.exclude, sharded=job.sharded)
        check_teacher(job.cfg, job.cfg.model, job.model)

    def read_text(self, job) -> None:
        job.samples = calibration_samples(job.cfg, job.tokenizer) if job.cfg.needs_data else None

    def place(self, job) -> None:
        job.device = torch.device(job.cfg.device) if job.cfg.device else job.accelerator.device
        job.model.to(job.device)

    def apply(self, job) -> dict[str, Any]:
        raise NotImplementedError

    def eval_record(self, job, report, before, after) -> dict[str, Any] | None:
        from .evaluation import eval_section

        return None if after is None else eval_section(job.cfg, before, after, job.held_out)

    def base_model(self, job, report) -> str | None:
        return job.cfg.model

    def before_save(self, job, report) -> None:
        pass


class Prune(Transform):
    """Zero the least important weights (in one pass, or in `rounds` recalibrated on the pruned model)."""

    def check(self, cfg: JobConfig, accelerator) -> bool:
        sharded = uses_fsdp(cfg.fsdp, accelerator)
        check_support(
            SupportQuery(cfg.prune, processes=accelerator.num_processes, sharded=sharded, job=cfg.to_flat())
        )
        if sharded and cfg.prune.layer_wise:
            _check_layer_wise_after_shards(cfg)
        if cfg.prune.rounds > 1 and cfg.recover.steps and cfg.recover.save_state_every:
            # the support table refuses --resume with rounds: a saved training state could never be used
            raise ConfigError(
                f"recover_save_state_every {cfg.recover.save_state_every} with rounds {cfg.prune.rounds} saves "
                "a training state that no run can resume (resume is refused with rounds): prune in one round "
                "to resume, or without recover_save_state_every"
            )
        return sharded

    def check_model(self, job) -> None:
        super().check_model(job)
        job.store = make_store(job.cfg, job)  # disk: every tensor must be in the files by name

    def check_outputs(self, cfg: JobConfig) -> None:
        # a saved calibration is never silently overwritten
        check_state_dir(
            resolve_state_dir(cfg.state_dir, cfg.output_dir), cfg.output_dir, cfg.save_state_every, cfg.resume
        )

    def read_text(self, job) -> None:
        super().read_text(job)
        job.batches = None
        if job.samples is not None:
            job.batches = micro_batches(job.samples, job.cfg.batch_size)
            if not job.sharded:  # replicated model: each rank its round-robin share of whole micro-batches
                acc = job.accelerator
                job.batches = round_robin_chunks(
                    job.batches, job.cfg.prune.grad_accum, acc.process_index, acc.num_processes
                )

    def place(self, job) -> None:
        from accelerate.utils import DistributedType

        cfg, acc = job.cfg, job.accelerator
        job.device = torch.device(cfg.device) if cfg.device else acc.device
        if cfg.offload != "none":
            if job.sharded:  # the whole-model statistics on row shards, then whole blocks from the files
                job.model = shard_model(job.model, acc, job.device)
            elif needs_whole_model(cfg.prune):  # the whole-model statistics first, then one block at a time
                job.model.to(job.device)
            return
        if job.sharded:  # FSDP2: every rank holds some rows of every weight; see parallel/fsdp.py
            job.model = shard_model(job.model, acc, job.device)
        elif acc.distributed_type == DistributedType.NO and cfg.device is None:
            # prepare() wraps in DDP for any multi-device type, even for one process launched by torchrun
            # (`--num_processes 1` with a multi-GPU config): only a plain single process gets it
            job.model = acc.prepare(job.model)  # device placement only: no optimizer, no DDP with one process
        else:
            job.model.to(job.device)  # several processes: no DDP wrapper, see calibration/loop.py

    def calibration_state(self, job) -> CalibState | None:
        """The resumable calibration state asked for (None without --save-state-every / --resume); the
        support table has refused it already on the paths where it does not work."""
        cfg = job.cfg
        if job.samples is None or not (cfg.save_state_every or cfg.resume):
            return None
        identity = run_identity(settings_identity(cfg), job.model, token_hash(job.samples))
        return CalibState(
            resolve_state_dir(cfg.state_dir, cfg.output_dir), cfg.save_state_every, cfg.resume, identity
        )

    def apply(self, job) -> dict[str, Any]:
        cfg, batches = job.cfg, job.batches
        if cfg.prune.rounds > 1:
            result = prune_in_rounds_(job.model, batches, cfg.prune, recover=cfg.recover, accelerator=job.accelerator,
                                      recover_batches=job.train[0] if job.train else None)  # fmt: skip
        else:
            state = self.calibration_state(job)
            if state is not None:
                job.saved_states.append(state)
            result = prune_(job.model, batches, cfg.prune, accelerator=job.accelerator, return_masks=False,
                            num_batches=len(batches) if batches is not None else None, calib_state=state,
                            offload=job.store)  # fmt: skip
        report = result.report
        report["offload"] = offload_record(job.store, job.device) if cfg.offload != "none" else None
        job.timings.update(report.pop("timings_s"))
        report["calibration"].update(calibration_input(cfg, job.samples))
        return report


def _check_layer_wise_after_shards(cfg: JobConfig) -> None:
    """FSDP2 serves a layer-wise run's whole-model statistics; its blocks then stream from the files."""
    if not needs_whole_model(cfg.prune):
        raise ConfigError(
            f"fsdp shards the whole-model statistics pass, and criterion {cfg.prune.criterion!r} reads no "
            "whole-model statistics and selects in no global scope: launch without --fsdp (the processes share the "
            "layer-wise pass)"
        )
    if cfg.offload != "disk":
        raise ConfigError(
            f"offload {cfg.offload!r} with fsdp is not supported in layer-wise mode: after the sharded "
            "statistics each rank reads the blocks whole from the model's files: use --offload disk"
        )


def make_store(cfg: JobConfig, job):
    """Where the layer-wise pass keeps the blocks (`offload`), checked before any text is read; disk: its
    pruned blocks are staged beside the output folder and moved into it when the checkpoint is written."""
    from ..io.atomic import make_partial_dir
    from ..offload import BlockStore, DiskStore

    if cfg.offload == "none":
        return None
    device = torch.device(cfg.device) if cfg.device else job.accelerator.device
    if cfg.offload == "cpu":
        return BlockStore(device, "cpu")
    prefix = block_list_prefix(job.model)
    store = DiskStore(device, resolve_model(cfg.model), None, getattr(torch, cfg.dtype), prefix,
                      trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    store.check(job.model)
    store.staging = make_partial_dir(job.out) if job.main else None  # one process writes the blocks
    return store


def offload_record(store, device) -> dict[str, Any]:
    """The offload mode and the peaks it reached: host RSS and, on a GPU, device memory allocated; the
    malloc mmap threshold the store set (None: not glibc)."""
    import resource

    peak_device = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None
    return {"mode": store.mode, "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": peak_device, "malloc_mmap_threshold": store.mmap_threshold}  # fmt: skip


class Shrink(Transform):
    """Remove whole channels, heads or layers: a smaller dense model. One process."""

    result = "smaller"

    def check(self, cfg: JobConfig, accelerator) -> bool:
        if accelerator.num_processes > 1:
            raise ConfigError(
                f"structure runs in one process, but this launch has {accelerator.num_processes}: launch without "
                "--num_processes (or with 1)"
            )
        return False

    def check_model(self, job) -> None:
        from ..structured.shrink import check_plan

        check_plan(job.model, job.cfg.structured)  # every model-dependent refusal, before any text is read
        super().check_model(job)
        job.store = make_store(job.cfg, job)

    def place(self, job) -> None:
        from ..structured.shrink import needs_whole_model as structure_needs_whole

        if job.cfg.offload == "none":
            return super().place(job)
        job.device = torch.device(job.cfg.device) if job.cfg.device else job.accelerator.device
        if structure_needs_whole(job.cfg.structured):  # the statistics first, then one block at a time
            job.model.to(job.device)

    def apply(self, job) -> dict[str, Any]:
        from ..structured import shrink_

        cfg = job.cfg
        bytes_before = weight_bytes(job.model)
        set_stage("removing units")
        batches = micro_batches(job.samples, cfg.batch_size) if job.samples is not None else None
        report = shrink_(job.model, batches, cfg.structured, progress=cfg.prune.progress, offload=job.store)
        job.timings.update({f"structure_{k}": v for k, v in report.pop("timings").items()})
        passes = report.pop("calibration")
        tokens = 0 if job.samples is None else job.samples.numel()
        report["calibration"] = {
            **calibration_record(passes=passes, tokens=tokens, threads=torch.get_num_threads()),
            **calibration_input(cfg, job.samples),
        }
        report["file_bytes_before"] = bytes_before
        report["offload"] = offload_record(job.store, job.device) if cfg.offload != "none" else None
        return report

    def before_save(self, job, report) -> None:
        report["tensor_shapes"] = tensor_shapes_of(job.model)


class Keep(Transform):
    """`recover`: the pruned folder's model as it is; its report comes along and gains a recovery section."""

    given = "pruned"
    result = None
    keeps_report = True

    def adjust(self, cfg: JobConfig) -> JobConfig:
        return with_training_seq_len(cfg)

    def check(self, cfg: JobConfig, accelerator) -> bool:
        self.folder = Path(resolve_model(cfg.model)).expanduser()
        check_default_output(cfg, self.folder)
        self.report = checked_report(self.folder)
        if not cfg.recover.steps:
            raise ConfigError("recover steps 0 trains nothing: give --recover-steps N")
        return False

    def check_model(self, job) -> None:
        check_targets(job.model, job.cfg)
        check_teacher(job.cfg, self.report.get("model"), job.model)

    def read_text(self, job) -> None:
        job.samples = None

    def apply(self, job) -> dict[str, Any]:
        report = self.report
        report["pruning_timings_s"] = report.pop("timings_s", None)
        return report

    def eval_record(self, job, report, before, after) -> dict[str, Any] | None:
        from .evaluation import eval_section

        old = report.get("eval")
        if before is None:
            return old
        record = eval_section(job.cfg, None, before, job.held_out)
        if (
            old and old.get("token_sha256") == record["token_sha256"]
        ):  # the dense score holds for these windows
            record["dense_ppl"], record["dense_nll"] = old.get("dense_ppl"), old.get("dense_nll")
        return record

    def base_model(self, job, report) -> str | None:
        return report.get("model")

    def before_save(self, job, report) -> None:
        report["recovered_from"] = self.folder.name


DEFAULT_OUTPUT = next(f.default for f in dataclasses.fields(JobConfig) if f.name == "output_dir")


def check_default_output(cfg: JobConfig, folder: Path) -> None:
    """`prune` writes to out/pruned by default, so `recover out/pruned` would write into its own input:
    say that the output was the default, which the user never named."""
    if cfg.output_dir != DEFAULT_OUTPUT:
        return
    out, src = Path(cfg.output_dir).expanduser().resolve(), folder.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ConfigError(
            f"recover writes to {DEFAULT_OUTPUT!r} unless --output-dir is given, and that is the pruned folder "
            f"{cfg.model!r} it reads: give --output-dir for the recovered model"
        )


def checked_report(folder: Path) -> dict[str, Any]:
    """The pruned folder's report, refused now (not after the training) when recover could not finish
    with it: JSON that does not parse, or lacks the zero counts or tensor shapes the save verifies."""
    name = f"{str(folder)!r}: pruning_report.json"
    try:
        report = read_report(folder)
    except ConfigError:
        raise
    except ValueError as err:  # JSON that does not parse, or bytes that are no text
        raise ConfigError(f"{name} is not valid JSON ({err}): prune again to rebuild the folder") from None
    parsed = check_verifiable(report, str(folder))
    if not parsed.structured and not (
        isinstance(report.get("target_weights"), int) and report["target_weights"] > 0
    ):
        raise ConfigError(f"{name} holds no target_weights count: prune again to rebuild the folder")
    return report


def check_targets(model, cfg: JobConfig, include=(), exclude=(), sharded: bool = False) -> None:
    """Before any text is read: the targets exist, the path can hold them, and the recovery asked for
    can train them."""
    targets = find_targets(model, include, exclude)
    check_views_supported(targets, sharded)
    if cfg.recover.steps or cfg.recover.round_steps:
        check_lora_targets(targets, cfg.recover.lora_r)


def calibration_input(cfg: JobConfig, samples) -> dict[str, Any]:
    """The part of the `calibration` record that describes its text: the same for every transform."""
    return {
        "samples": 0 if samples is None else samples.shape[0],
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "token_sha256": None if samples is None else token_hash(samples),
    }


def transform_for(cfg: JobConfig) -> Transform:
    return Shrink() if cfg.structured is not None else Prune()
