"""The one job skeleton every command runs; `Transform` (transforms.py) is the only part that differs.

A `Job` carries one run's live state from step to step; each step is a small function. Resume and
saved state belong to the skeleton: the transform and the recovery register what they saved in
`job.saved_states`, which is cleared only once the checkpoint is verified and in place (a save that
fails, a full disk included, keeps them for `--resume`). The plan also claims the output folder (a
lock beside it, io/atomic.claim_output) and checks that no input lies in it and that it has room;
the lock is held until the run ends, however it ends.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..calibration.assets import resolve_model
from ..config import JobConfig
from ..errors import ConfigError
from ..io.atomic import claim_output, release_output
from ..io.checkpoint import check_output_dir, save_pruned
from ..io.hub import check_repo_id, check_revision, push_folder
from ..models import describe_dataset, describe_model, looks_local
from ..parallel import all_reduce_scalars, make_accelerator
from ..parallel.fsdp import full_state_dict
from ..status import set_stage
from ..tasks import check_tasks
from .evaluation import held_out_perplexity, task_scores, tasks_section
from .fits import check_run_fits
from .inputs import held_out_samples, load, training_batches
from .preflight import (
    check_device,
    check_free_space,
    folder_weight_bytes,
    quiet_hf_progress_bars,
    space_error,
    versions,
    weight_bytes,
)
from .recovery import recovery_step

TIMING_KEYS = ("load_model", "eval_dense", "eval_pruned", "recovery", "eval_tasks_dense", "eval_tasks_pruned",
               "eval_tasks_recovered")  # fmt: skip


@dataclass
class Job:
    """One run as it moves through the skeleton."""

    cfg: JobConfig
    transform: Any  # transforms.Transform
    accelerator: Any
    out: Path
    sharded: bool = False
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))
    model: Any = None
    tokenizer: Any = None
    device: Any = None
    samples: torch.Tensor | None = None  # the calibration text, when the transform reads one
    batches: list | None = None  # this rank's micro-batches of it
    held_out: torch.Tensor | None = None
    train: tuple[list[torch.Tensor], str] | None = None
    saved_states: list[Any] = field(default_factory=list)  # cleared once the checkpoint is in place
    lock: Path | None = None  # the output lock (io/atomic.claim_output), on the main process
    store: Any = None  # offload.BlockStore of a run with offload (disk: stages the pruned blocks)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def evaluates(self) -> bool:
        """Perplexity before and after, on the same windows; with row shards every rank takes part."""
        return self.held_out is not None and (self.sharded or self.main)

    def timed(self, key: str, stage: str, fn, *args, **kw):
        set_stage(stage)
        t = time.perf_counter()
        out = fn(*args, **kw)
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t
        return out

    def perplexity(self) -> dict[str, Any]:
        return held_out_perplexity(
            self.cfg, self.model, self.held_out, device=self.device, progress=self.main
        )


def run_job(cfg: JobConfig, transform) -> dict[str, Any]:
    """Plan, load, read, evaluate, transform, evaluate, recover, save: the report of the run."""
    set_stage("planning the run")
    cfg = transform.adjust(cfg)
    if not cfg.prune.progress:
        quiet_hf_progress_bars()
    job = plan(cfg, transform)
    try:  # the output lock is held from the plan to the end, whatever ends the run (Ctrl-C too)
        return run_planned(job)
    finally:
        if job.store is not None and hasattr(job.store, "cleanup"):
            job.store.cleanup()  # offload disk's staged blocks: moved into the output, or dropped
        release_output(job.lock)


def run_planned(job: Job) -> dict[str, Any]:
    """Every step after the plan: the report of the run."""
    cfg, transform = job.cfg, job.transform
    job.model, job.tokenizer, _ = job.timed("load_model", "loading the model", load, cfg)
    # exact now, also for a Hub model, and still before any text is read
    check_free_space(job.out, weight_bytes(job.model), f"{cfg.dtype} weights of the loaded model")
    transform.check_model(job)
    job.timed("load_data", "reading the text", read_text, job)
    transform.place(job)
    before, before_tasks = evaluate(job, transform.given)
    report = transform.apply(job)
    describe_job(job, report)
    after, after_tasks = evaluate(job, transform.result) if transform.result else (before, before_tasks)
    report["eval_tasks"] = (
        tasks_section(before_tasks, after_tasks) if transform.result else report.get("eval_tasks")
    )
    report["eval"] = transform.eval_record(job, report, before, after)
    report["recovery"] = None
    if cfg.recover.steps:
        recover(job, report)
    finish(job, report)
    return report


def plan(cfg: JobConfig, transform) -> Job:
    """Everything checked before any work (raises ConfigError): the Job to run."""
    accelerator = make_accelerator(cpu=cfg.device == "cpu")  # CPU-only machines: see parallel/
    sharded, resolved, out, device = checked_plan(cfg, transform, accelerator)
    if cfg.structured is None and not transform.keeps_report:  # what the memory model describes
        check_run_fits(cfg, sharded, accelerator.num_processes, device)
    if looks_local(resolved):
        check_free_space(out, folder_weight_bytes(resolved, cfg.dtype), f"{cfg.dtype} weights of the model")
    if cfg.prune.threads is not None:
        torch.set_num_threads(cfg.prune.threads)
    lock = claim_on_main(accelerator, out)  # last: a refusal above leaves no lock behind
    return Job(cfg, transform, accelerator, out, sharded, lock=lock)


def checked_plan(cfg: JobConfig, transform, accelerator) -> tuple[bool, str, Path, torch.device]:
    """The planning checks that write nothing and take no lock (also what `--dry-run` runs): (rows
    sharded, the resolved model, the output folder, the device)."""
    check_device(cfg.device)
    sharded = transform.check(cfg, accelerator)
    check_tasks(cfg.eval_tasks, cfg.eval_tasks_include_path)
    if cfg.push_to_hub:
        check_repo_id(cfg.push_to_hub)
        check_revision(cfg.push_revision)
    if accelerator.is_main_process:
        resolve_model(cfg.model)
    accelerator.wait_for_everyone()  # the main process unpacks a built-in once; the others reuse it
    resolved = resolve_model(cfg.model)
    out = check_output_dir(cfg.output_dir, cfg.overwrite, inputs=run_inputs(cfg, transform, resolved))
    transform.check_outputs(cfg)
    return sharded, resolved, out, torch.device(cfg.device) if cfg.device else accelerator.device


def run_inputs(cfg: JobConfig, transform, model: str) -> dict[str, str | None]:
    """{what: path} of everything the run reads that a replaced output folder must not take along
    (Hub ids and built-in names are no paths here, and are skipped)."""
    report = getattr(transform, "report", None) if transform.keeps_report else None
    base = report.get("model") if isinstance(report, dict) else None
    return {
        "pruned folder" if transform.keeps_report else "model's own folder": model,
        "teacher model": (cfg.recover.teacher or base) if cfg.recover.distills else None,
        "dataset": cfg.dataset,
        "task folder": cfg.eval_tasks_include_path,
    }


def claim_on_main(accelerator, out: Path) -> Path | None:
    """The main process takes the output lock; every process refuses together if it cannot (the
    others would wait for it at the first collective otherwise)."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = claim_output(out, command_line())
        except ConfigError as err:
            refused = err
    if all_reduce_scalars([0.0 if refused else 1.0], op="min")[0] == 0.0:
        raise refused or ConfigError(f"output_dir {str(out)!r} is being written by another run")
    return lock


def command_line() -> str:
    """This run's command as the lock records it (`python -m llm_gradprune` reads as the CLI)."""
    name = Path(sys.argv[0]).name
    return shlex.join(["llm-gradprune" if name == "__main__.py" else name, *sys.argv[1:]])


def read_text(job: Job) -> None:
    """The held-out windows and the training text (the transform reads its own calibration text)."""
    cfg, acc = job.cfg, job.accelerator
    job.transform.read_text(job)
    job.held_out = held_out_samples(cfg, job.tokenizer, job.model) if cfg.eval else None
    world = 1 if job.sharded else acc.num_processes
    job.train = training_batches(cfg, job.tokenizer, acc.process_index if world > 1 else 0, world)


def evaluate(job: Job, which: str) -> tuple[dict | None, dict | None]:
    """(held-out perplexity, task scores) of the model as it is now; None where not asked or not ours."""
    tasks = task_scores(job.cfg, job.model, job.tokenizer, which, job.timings) if job.main else None
    if not job.evaluates:
        return None, tasks
    key = "eval_dense" if which in ("dense", "given") else "eval_pruned"
    return job.timed(key, f"evaluating the {which} model", job.perplexity), tasks


def describe_job(job: Job, report: dict[str, Any]) -> None:
    """The job's keys of every report: model, data, seed, versions and readable names."""
    cfg = job.cfg
    report["model"] = report.get("model") if job.transform.keeps_report else cfg.model
    report["dataset"] = report.get("dataset") or {
        "name": cfg.dataset,
        "split": cfg.split,
        "text_column": cfg.text_column,
    }
    report["seed"] = report.get("seed", cfg.seed)
    report["versions"] = versions()
    report["base_model"] = report.get("base_model") or describe_model(cfg.model)
    report["calibration_dataset"] = report.get("calibration_dataset") or describe_dataset(cfg.dataset)


def recover(job: Job, report: dict[str, Any]) -> None:
    """Masked recovery training, then the recovered model's perplexity and task scores."""
    t = time.perf_counter()
    job.model, state = recovery_step(job.cfg, job.model, job.train, report, base=job.transform.base_model(job, report),
                                    accelerator=job.accelerator, held_out=job.held_out if job.evaluates else None)  # fmt: skip
    if state is not None:
        job.saved_states.append(state)
    job.timings["recovery"] = time.perf_counter() - t
    if report["eval"] is not None and job.evaluates:  # the same windows as before
        report["eval"]["recovered_ppl"] = job.timed("eval_recovered", "evaluating the recovered model",
                                                    job.perplexity)["ppl"]  # fmt: skip
    if report["eval_tasks"] is not None and job.main:
        report["eval_tasks"]["recovered"] = task_scores(
            job.cfg, job.model, job.tokenizer, "recovered", job.timings
        )["tasks"]


def finish(job: Job, report: dict[str, Any]) -> None:
    """Save and verify on the main process, push, then clear the saved states; every rank waits."""
    cfg = job.cfg
    job.transform.before_save(job, report)
    report["timings_s"] = job.timings
    disk = getattr(job.store, "mode", None) == "disk"  # written block by block from the files
    state_dict = (
        full_state_dict(job.model, job.accelerator) if job.sharded and not disk else None
    )  # collective
    if job.main:
        t = time.perf_counter()
        set_stage("saving the checkpoint")
        model = job.accelerator.unwrap_model(job.model)
        job.timings["before_save"] = time.perf_counter() - job.start
        try:
            writer = job.store.write_weights if disk else None
            save_pruned(model, job.tokenizer, report, job.out, settings=cfg.to_flat(),
                        max_shard_bytes=cfg.max_shard_bytes, state_dict=state_dict, model_id=cfg.push_to_hub,
                        weights_writer=writer)  # fmt: skip
        except Exception as err:
            if space_error(err) is None:
                raise
            raise ConfigError(write_failure(job, err)) from None
        job.timings["save_and_verify"] = time.perf_counter() - t  # after the report file: printed only
        report["output_dir"] = str(job.out)
        if cfg.push_to_hub:
            push(cfg, job.out, report)
        for state in job.saved_states:  # the checkpoint is in place: the saved states are no longer needed
            state.clear()
    job.accelerator.wait_for_everyone()


def write_failure(job: Job, err: BaseException) -> str:
    """One line for a full disk during the save: the partial folder is gone (atomic save), the saved
    states are kept (they are cleared only after a verified save), and how to go on from them."""
    line = f"could not write the checkpoint to {str(job.out)!r}: {space_error(err)} ({err})"
    kept = [state for state in job.saved_states if state.steps.latest() is not None]
    if kept:
        where = ", ".join(repr(str(state.dir)) for state in kept)
        return f"{line}; the saved state is kept in {where}: free some space and rerun with --resume"
    return f"{line}; nothing was written: free some space and rerun"


def push(cfg: JobConfig, out: Path, report: dict[str, Any]) -> None:
    """The checkpoint is in place: a failed push is reported (and retried with `push`), not a re-prune."""
    set_stage("pushing to the Hub")
    try:
        report["push"] = push_folder(
            out, cfg.push_to_hub, private=cfg.push_private, revision=cfg.push_revision
        )
    except ConfigError as err:
        report["push"] = {"error": str(err)}


__all__ = ["Job", "run_job"]
