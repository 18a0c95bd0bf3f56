"""The main job end to end: plan, load model and text, prune, evaluate, save and verify.

The commands and scripts call `run_prune` / `run_eval`. Everything that can be checked without the
compute is checked first, before the model is loaded: the support table for the path this launch
takes, the output folder (free, writable), the saved calibration state, the device.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from typing import Any

import torch

from . import __version__
from .calibration.assets import resolve_model
from .calibration.data import load_blocks, micro_batches, shard_samples, token_hash
from .config import JobConfig
from .errors import ConfigError
from .evaluate import perplexity
from .executors import prune_
from .parallel.fsdp import full_state_dict, shard_model, uses_fsdp
from .io.calib_state import calib_state_for, check_state
from .io.checkpoint import check_output_dir, save_pruned
from .io.hub import check_repo_id, check_revision, push_folder
from .models import _looks_local, describe_dataset, describe_model, load_model
from .parallel import make_accelerator
from .recovery.phase import run_recovery, training_batches
from .rounds import prune_in_rounds_
from .status import set_stage
from .support import Run, check_support
from .tasks import check_tasks, run_tasks

log = logging.getLogger("llm_gradprune")


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import safetensors
    import transformers

    return {
        "llm_gradprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "safetensors": safetensors.__version__,
    }


def check_device(device: str | None) -> None:
    """A forced device must exist here: say so in one line instead of torch's assertion."""
    if device is None or device == "cpu":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {device!r} is not a device name: use cpu, cuda, cuda:1, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} is not available: this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} is not available: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None)
        if backend is None or not backend.is_available():
            raise ConfigError(f"device {device!r} is not available on this machine")


def eval_blocks(cfg: JobConfig, tokenizer, model=None) -> torch.Tensor:
    """The held-out windows `cfg` describes (eval_split, eval_num_samples x eval_seq_len tokens)."""
    seq_len = cfg.eval_seq_len or cfg.seq_len
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"eval_seq_len {seq_len} is larger than the model's context of {context} tokens")
    return load_blocks(cfg, tokenizer, split=cfg.eval_split, num_blocks=cfg.eval_num_samples, seq_len=seq_len)


def _perplexity(cfg: JobConfig, model, blocks, device=None, progress: bool = True) -> dict[str, Any]:
    return perplexity(model, blocks, batch_size=cfg.eval_batch_size, stride=cfg.eval_stride,
                      progress=progress and cfg.prune.progress, device=device)  # fmt: skip


def run_eval(cfg: JobConfig) -> dict[str, Any]:
    """Perplexity of `cfg.model` on `cfg.eval_num_samples` held-out windows of `cfg.dataset`, or, with
    `eval_tasks`, its lm-eval task scores."""
    check_device(cfg.device)
    check_tasks(cfg.eval_tasks, cfg.eval_tasks_include_path)
    t = time.perf_counter()
    model, tokenizer, _ = load_model(cfg)
    if cfg.device:
        model.to(cfg.device)
    elif torch.cuda.is_available():
        model.to("cuda")
    load_s = time.perf_counter() - t
    if cfg.eval_tasks:
        out = _tasks(cfg, model, tokenizer, "given", {})
        return {"model": cfg.model, **out, "load_s": load_s}
    blocks = eval_blocks(cfg, tokenizer, model)
    result = _perplexity(cfg, model, blocks)
    return {
        "model": cfg.model,
        "dataset": {"name": cfg.dataset, "split": cfg.eval_split, "text_column": cfg.text_column},
        "seq_len": blocks.shape[1],
        "stride": cfg.eval_stride,
        "batch_size": cfg.eval_batch_size,
        "seed": cfg.seed,
        "token_sha256": token_hash(blocks),
        **result,
        "load_s": load_s,
    }


def quiet_hf_progress_bars() -> None:
    """--no-progress also silences the bars transformers and datasets draw while loading."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _tasks(cfg: JobConfig, model, tokenizer, which: str, timings: dict) -> dict | None:
    """lm-eval scores of the model as it is now, or None when no task was asked for."""
    if not cfg.eval_tasks:
        return None
    set_stage(f"scoring lm-eval tasks on the {which} model")
    t = time.perf_counter()
    out = run_tasks(model, tokenizer, cfg.eval_tasks, include_path=cfg.eval_tasks_include_path,
                    batch_size=cfg.eval_batch_size, limit=cfg.eval_tasks_limit, num_fewshot=cfg.eval_tasks_fewshot)  # fmt: skip
    timings[f"eval_tasks_{which}"] = time.perf_counter() - t
    return out


def plan_job(cfg: JobConfig, accelerator) -> tuple[bool, Any]:
    """Everything checked before any work: (rows sharded?, output folder). Raises ConfigError."""
    check_device(cfg.device)
    sharded = uses_fsdp(cfg.fsdp, accelerator)
    run = Run(cfg.prune, processes=accelerator.num_processes, sharded=sharded,
              resume=bool(cfg.save_state_every or cfg.resume), fsdp_asked=cfg.fsdp, eval=cfg.eval,
              eval_tasks=bool(cfg.eval_tasks), recover=bool(cfg.recover.steps))  # fmt: skip
    check_support(run)
    check_tasks(cfg.eval_tasks, cfg.eval_tasks_include_path)
    if cfg.push_to_hub:
        check_repo_id(cfg.push_to_hub)
        check_revision(cfg.push_revision)
    if accelerator.is_main_process:
        resolve_model(cfg.model)
    accelerator.wait_for_everyone()  # the main process unpacks a built-in once; the others reuse it
    resolved = resolve_model(cfg.model)
    out = check_output_dir(cfg.output_dir, cfg.overwrite, resolved if _looks_local(resolved) else None)
    check_state(cfg)  # a saved calibration is never silently overwritten
    return sharded, out


def weight_bytes(model) -> int:
    """Bytes of the model's distinct parameters and buffers that a checkpoint stores (tied ones once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _push(cfg: JobConfig, out, report: dict[str, Any]) -> None:
    """The checkpoint is in place: a failed push is reported (and retried with `push`), not a re-prune."""
    set_stage("pushing to the Hub")
    try:
        report["push"] = push_folder(
            out, cfg.push_to_hub, private=cfg.push_private, revision=cfg.push_revision
        )
    except ConfigError as err:
        report["push"] = {"error": str(err)}


def _describe_job(cfg: JobConfig, report: dict[str, Any]) -> None:
    """The job's keys of every report: model, data, seed, versions and readable names."""
    report["model"] = cfg.model
    report["dataset"] = {"name": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column}
    report["seed"] = cfg.seed
    report["versions"] = versions()
    report["base_model"] = describe_model(cfg.model)
    report["calibration_dataset"] = describe_dataset(cfg.dataset)


def _task_section(cfg: JobConfig, model, tokenizer, dense_tasks: dict | None, timings: dict) -> dict | None:
    """lm-eval scores of the pruned model beside the dense ones, or None when no task was asked for."""
    if dense_tasks is None:
        return None
    pruned = _tasks(cfg, model, tokenizer, "pruned", timings)
    return {
        **{k: v for k, v in pruned.items() if k != "tasks"},
        "dense": dense_tasks["tasks"],
        "pruned": pruned["tasks"],
    }


def _eval_section(cfg: JobConfig, dense: dict, pruned: dict, held_out) -> dict[str, Any]:
    return {
        "dense_ppl": dense["ppl"],
        "pruned_ppl": pruned["ppl"],
        "dense_nll": dense["nll"],
        "pruned_nll": pruned["nll"],
        "tokens": pruned["tokens"],
        "windows": pruned["windows"],
        "split": cfg.eval_split,
        "seq_len": held_out.shape[1],
        "stride": cfg.eval_stride,
        "token_sha256": token_hash(held_out),
        "recovered_ppl": None,
    }


def run_structure(cfg: JobConfig) -> dict[str, Any]:
    """Structured pruning as a job: remove whole units of `cfg.model`, then (as asked) evaluate, recover,
    save a smaller dense checkpoint with its report and card, and push. One process."""
    from .structured import find_units, shrink_

    start = time.perf_counter()
    set_stage("planning the run")
    if not cfg.prune.progress:
        quiet_hf_progress_bars()
    accelerator = make_accelerator(cpu=cfg.device == "cpu")
    if accelerator.num_processes > 1:
        raise ConfigError(
            f"structure runs in one process, but this launch has {accelerator.num_processes}: launch without "
            "--num_processes (or with 1)"
        )
    check_device(cfg.device)
    check_tasks(cfg.eval_tasks, cfg.eval_tasks_include_path)
    if cfg.push_to_hub:
        check_repo_id(cfg.push_to_hub)
        check_revision(cfg.push_revision)
    resolved = resolve_model(cfg.model)
    out = check_output_dir(cfg.output_dir, cfg.overwrite, resolved if _looks_local(resolved) else None)
    if cfg.prune.threads is not None:
        torch.set_num_threads(cfg.prune.threads)

    t = time.perf_counter()
    set_stage("loading the model")
    model, tokenizer, _ = load_model(cfg)
    find_units(model)  # a model outside the Llama family is refused here, before any text is read
    timings = {"load_model": time.perf_counter() - t, "eval_dense": 0.0, "eval_pruned": 0.0, "recovery": 0.0}
    context = getattr(model.config, "max_position_embeddings", None)
    if cfg.needs_data and context is not None and cfg.seq_len > context:
        raise ConfigError(f"seq_len {cfg.seq_len} is larger than the model's context of {context} tokens")
    t = time.perf_counter()
    set_stage("reading the text")
    blocks = load_blocks(cfg, tokenizer) if cfg.needs_data else None
    held_out = eval_blocks(cfg, tokenizer, model) if cfg.eval else None
    train = training_batches(cfg, tokenizer)
    timings["load_data"] = time.perf_counter() - t
    device = torch.device(cfg.device) if cfg.device else accelerator.device
    model.to(device)
    dense_tasks = _tasks(cfg, model, tokenizer, "dense", timings)
    if held_out is not None:
        t = time.perf_counter()
        set_stage("evaluating the dense model")
        dense_eval = _perplexity(cfg, model, held_out, device=device)
        timings["eval_dense"] = time.perf_counter() - t
    bytes_before = weight_bytes(model)
    set_stage("removing units")
    batches = micro_batches(blocks, cfg.batch_size) if blocks is not None else None
    report = shrink_(model, batches, cfg.structured, progress=cfg.prune.progress)
    timings.update({f"structure_{k}": v for k, v in report.pop("timings").items()})
    _describe_job(cfg, report)
    report["calibration"] = {
        "passes": report.pop("calibration"),
        "blocks": 0 if blocks is None else blocks.shape[0],
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "tokens": 0 if blocks is None else blocks.numel(),
        "token_sha256": None if blocks is None else token_hash(blocks),
    }
    report["file_bytes_before"] = bytes_before
    report["eval_tasks"] = _task_section(cfg, model, tokenizer, dense_tasks, timings)
    report["eval"] = None
    if held_out is not None:
        t = time.perf_counter()
        set_stage("evaluating the smaller model")
        report["eval"] = _eval_section(
            cfg, dense_eval, _perplexity(cfg, model, held_out, device=device), held_out
        )
        timings["eval_pruned"] = time.perf_counter() - t
    report["recovery"] = None
    if cfg.recover.steps:
        t = time.perf_counter()
        model = run_recovery(
            cfg, model, tokenizer, train, base=cfg.model, report=report, eval_blocks=held_out
        )
        timings["recovery"] = time.perf_counter() - t
        if report["eval"] is not None:
            set_stage("evaluating the recovered model")
            report["eval"]["recovered_ppl"] = _perplexity(cfg, model, held_out, device=device)["ppl"]
        if report["eval_tasks"] is not None:
            report["eval_tasks"]["recovered"] = _tasks(cfg, model, tokenizer, "recovered", timings)["tasks"]
    report["tensor_shapes"] = {k: list(v.shape) for k, v in model.state_dict().items()}
    report["timings_s"] = timings
    t = time.perf_counter()
    set_stage("saving the checkpoint")
    timings["before_save"] = time.perf_counter() - start
    save_pruned(model, tokenizer, cfg, report, out, model_id=cfg.push_to_hub)
    timings["save_and_verify"] = time.perf_counter() - t
    report["output_dir"] = str(out)
    if cfg.push_to_hub:
        _push(cfg, out, report)
    if report["recovery"] and report["recovery"].get("state_folder"):
        shutil.rmtree(report["recovery"]["state_folder"], ignore_errors=True)
    return report


def run_prune(cfg: JobConfig) -> dict[str, Any]:
    """Prune `cfg.model` on `cfg.dataset` and write the checkpoint to `cfg.output_dir`; returns the report."""
    from accelerate.utils import DistributedType

    if cfg.structured is not None:
        return run_structure(cfg)
    start = time.perf_counter()
    set_stage("planning the run")
    if not cfg.prune.progress:
        quiet_hf_progress_bars()
    accelerator = make_accelerator(cpu=cfg.device == "cpu")  # CPU-only machines: see parallel.py
    sharded, out = plan_job(cfg, accelerator)

    t = time.perf_counter()
    set_stage("loading the model")
    model, tokenizer, _ = load_model(cfg)
    timings = {"load_model": time.perf_counter() - t, "eval_dense": 0.0, "eval_pruned": 0.0, "recovery": 0.0,
               "eval_tasks_dense": 0.0, "eval_tasks_pruned": 0.0, "eval_tasks_recovered": 0.0}  # fmt: skip
    context = getattr(model.config, "max_position_embeddings", None)
    if cfg.needs_data and context is not None and cfg.seq_len > context:
        raise ConfigError(f"seq_len {cfg.seq_len} is larger than the model's context of {context} tokens")

    t = time.perf_counter()
    batches, calib_hash = None, None
    set_stage("reading the text")
    if cfg.needs_data:
        blocks = load_blocks(cfg, tokenizer)
        calib_hash = token_hash(blocks)
        batches = micro_batches(blocks, cfg.batch_size)
        if not sharded:  # replicated model: each rank its round-robin share of whole micro-batches
            batches = shard_samples(batches, cfg.prune.grad_accum, accelerator.process_index,
                                    accelerator.num_processes)  # fmt: skip
    held_out = eval_blocks(cfg, tokenizer, model) if cfg.eval else None
    train = training_batches(
        cfg, tokenizer, accelerator.process_index, 1 if sharded else accelerator.num_processes
    )
    timings["load_data"] = time.perf_counter() - t
    calib_state = calib_state_for(cfg, model, calib_hash) if cfg.needs_data else None

    device = torch.device(cfg.device) if cfg.device else accelerator.device
    if sharded:  # FSDP2: every rank holds some rows of every weight; see parallel/fsdp.py
        model = shard_model(model, accelerator, device)
    elif accelerator.distributed_type == DistributedType.NO and cfg.device is None:
        # prepare() wraps in DDP for any multi-device type, even for one process launched by torchrun
        # (`--num_processes 1` with a multi-GPU config): only a plain single process gets it
        model = accelerator.prepare(model)  # device placement only: no optimizer, no DDP with one process
    else:
        model.to(device)  # several processes: no DDP wrapper, see calibration/loop.py
    # held-out perplexity before and after, on the same windows; with row shards every rank takes part
    evaluates = held_out is not None and (sharded or accelerator.is_main_process)
    dense_tasks = _tasks(cfg, model, tokenizer, "dense", timings) if accelerator.is_main_process else None
    if evaluates:
        t = time.perf_counter()
        set_stage("evaluating the dense model")
        dense_eval = _perplexity(cfg, model, held_out, device=device, progress=accelerator.is_main_process)
        timings["eval_dense"] = time.perf_counter() - t
    if cfg.prune.rounds > 1:
        result = prune_in_rounds_(model, batches, cfg.prune, recover=cfg.recover, accelerator=accelerator,
                                  recover_batches=train[0] if train else None)  # fmt: skip
    else:
        result = prune_(model, batches, cfg.prune, accelerator=accelerator, return_masks=False,
                        num_batches=len(batches) if batches is not None else None,
                        calib_state=calib_state)  # fmt: skip
    report = result.report
    timings.update(report.pop("timings_s"))
    _describe_job(cfg, report)
    report["calibration"].update(
        {"token_sha256": calib_hash, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size}
    )
    report["eval_tasks"] = _task_section(cfg, model, tokenizer, dense_tasks, timings)
    report["eval"] = None
    if evaluates:
        t = time.perf_counter()
        set_stage("evaluating the pruned model")
        pruned_eval = _perplexity(cfg, model, held_out, device=device, progress=accelerator.is_main_process)
        timings["eval_pruned"] = time.perf_counter() - t
        report["eval"] = _eval_section(cfg, dense_eval, pruned_eval, held_out)
    report["recovery"] = None
    if cfg.recover.steps:
        t = time.perf_counter()
        model = run_recovery(cfg, model, tokenizer, train, base=cfg.model, accelerator=accelerator, report=report,
                             eval_blocks=held_out if evaluates else None)  # fmt: skip
        timings["recovery"] = time.perf_counter() - t
        if report["eval"] is not None:  # the same windows as dense and pruned
            set_stage("evaluating the recovered model")
            report["eval"]["recovered_ppl"] = _perplexity(cfg, model, held_out, device=device,
                                                          progress=accelerator.is_main_process)["ppl"]  # fmt: skip
        if report["eval_tasks"] is not None:
            report["eval_tasks"]["recovered"] = _tasks(cfg, model, tokenizer, "recovered", timings)["tasks"]
    report["timings_s"] = timings
    state_dict = full_state_dict(model, accelerator) if sharded else None  # collective

    if accelerator.is_main_process:
        t = time.perf_counter()
        set_stage("saving the checkpoint")
        model = accelerator.unwrap_model(model)
        timings["before_save"] = time.perf_counter() - start
        save_pruned(model, tokenizer, cfg, report, out, state_dict=state_dict, model_id=cfg.push_to_hub)
        timings["save_and_verify"] = time.perf_counter() - t  # after the report file: printed only
        report["output_dir"] = str(out)
        if cfg.push_to_hub:
            _push(cfg, out, report)
        if calib_state is not None:
            calib_state.clear()  # the checkpoint is in place: the calibration state is no longer needed
        if report["recovery"] and report["recovery"].get("state_folder"):
            shutil.rmtree(report["recovery"]["state_folder"], ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def run_recover(cfg: JobConfig) -> dict[str, Any]:
    """`llm-gradprune recover`: masked training of the pruned folder `cfg.model` into `cfg.output_dir`.

    The pruned folder's own report comes along (criterion, counts, calibration), with a recovery section,
    the zero counts after training and, with `eval`, perplexity before and after on the same windows."""
    import dataclasses
    from pathlib import Path

    from .recovery.phase import read_report

    set_stage("planning the run")
    if cfg.recover.seq_len is not None:  # one block length here: training windows and held-out windows
        cfg = dataclasses.replace(cfg, seq_len=cfg.recover.seq_len)
    if not cfg.prune.progress:
        quiet_hf_progress_bars()
    folder = Path(resolve_model(cfg.model)).expanduser()
    report = read_report(folder)
    if not cfg.recover.steps:
        raise ConfigError("recover steps 0 trains nothing: give --steps N")
    accelerator = make_accelerator(cpu=cfg.device == "cpu")
    check_device(cfg.device)
    out = check_output_dir(cfg.output_dir, cfg.overwrite, str(folder))
    set_stage("loading the model")
    model, tokenizer, _ = load_model(cfg)
    set_stage("reading the text")
    train = training_batches(cfg, tokenizer, accelerator.process_index, accelerator.num_processes)
    held_out = eval_blocks(cfg, tokenizer, model) if cfg.eval else None
    device = torch.device(cfg.device) if cfg.device else accelerator.device
    model.to(device)
    main = accelerator.is_main_process
    before = (
        _perplexity(cfg, model, held_out, device=device, progress=main)
        if held_out is not None and main
        else None
    )
    model = run_recovery(cfg, model, tokenizer, train, base=report.get("model"), accelerator=accelerator, report=report,
                         eval_blocks=held_out if main else None)  # fmt: skip
    if before is not None:
        after = _perplexity(cfg, model, held_out, device=device, progress=main)
        report["eval"] = {**(report.get("eval") or {}), "pruned_ppl": before["ppl"], "recovered_ppl": after["ppl"],
                          "tokens": after["tokens"], "windows": after["windows"], "split": cfg.eval_split,
                          "seq_len": held_out.shape[1], "token_sha256": token_hash(held_out)}  # fmt: skip
        report["eval"].setdefault("dense_ppl", None)
    report["recovered_from"] = folder.name
    if main:
        set_stage("saving the checkpoint")
        save_pruned(accelerator.unwrap_model(model), tokenizer, cfg, report, out)
        report["output_dir"] = str(out)
        if report["recovery"].get("state_folder"):
            shutil.rmtree(report["recovery"]["state_folder"], ignore_errors=True)
    accelerator.wait_for_everyone()
    return report
