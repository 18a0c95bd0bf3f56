"""The main job end to end: load model and text, prune, save, verify. The CLI and scripts call this."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__, criteria
from .assets import resolve_model
from .checkpoint import check_output_dir, save_pruned
from .config import ConfigError, PruneConfig
from .data import load_blocks, micro_batches, shard_samples, token_hash
from .distributed import make_accelerator
from .evaluate import perplexity
from .pruner import prune_
from .resume import check_state, checkpointer_for
from .sharded import run_sharded, uses_fsdp

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_model(cfg: PruneConfig, name: str | None = None):
    """(model, tokenizer, local_path_or_id) for a Hub id, a local folder or a built-in alias."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = name or cfg.model
    path = resolve_model(name)
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise ConfigError(
            f"model {name!r} does not exist: give a Hub id, a local folder or builtin:smollm2-135m"
        )
    path = str(Path(path).expanduser()) if _looks_local(path) else path
    if _looks_local(path) and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model folder {name!r} has no config.json: it is not a Hugging Face model folder")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {name!r} cannot be loaded: {_first_line(err)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], use_safetensors=True, trust_remote_code=cfg.trust_remote_code
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            kind = type(hf_config).__name__
            raise ConfigError(f"model {name!r} ({kind}) is not a causal language model") from None
        raise
    except OSError as err:  # e.g. only pickled .bin weights: use_safetensors refuses them
        if "safetensors" in str(err):
            raise ConfigError(
                f"model {name!r} has no loadable safetensors weights (pickled .bin files are never "
                f"loaded): {_first_line(err)}"
            ) from None
        raise ConfigError(f"model {name!r} cannot be loaded: {_first_line(err)}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    context = getattr(hf_config, "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise ConfigError(f"seq_len {cfg.seq_len} is larger than the model's context of {context} tokens")
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"model {name!r} has NaN/inf values in {pname}: refusing to calibrate on it")
    return model, tokenizer, path


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


def eval_blocks(cfg: PruneConfig, tokenizer, model=None) -> torch.Tensor:
    """The held-out windows `cfg` describes (eval_split, eval_num_samples x eval_seq_len tokens)."""
    seq_len = cfg.eval_seq_len or cfg.seq_len
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"eval_seq_len {seq_len} is larger than the model's context of {context} tokens")
    if cfg.eval_stride is not None and cfg.eval_stride > seq_len:
        raise ConfigError(f"eval_stride {cfg.eval_stride} is larger than eval_seq_len {seq_len}")
    return load_blocks(cfg, tokenizer, split=cfg.eval_split, num_blocks=cfg.eval_num_samples, seq_len=seq_len)


def run_eval(cfg: PruneConfig) -> dict[str, Any]:
    """Perplexity of `cfg.model` on `cfg.eval_num_samples` held-out windows of `cfg.dataset`."""
    t = time.perf_counter()
    model, tokenizer, _ = load_model(cfg)
    if cfg.device:
        model.to(cfg.device)
    elif torch.cuda.is_available():
        model.to("cuda")
    load_s = time.perf_counter() - t
    blocks = eval_blocks(cfg, tokenizer, model)
    result = perplexity(
        model, blocks, batch_size=cfg.eval_batch_size, stride=cfg.eval_stride, progress=cfg.progress
    )
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


def _eval_now(cfg: PruneConfig, model, blocks) -> dict[str, float]:
    return perplexity(
        model, blocks, batch_size=cfg.eval_batch_size, stride=cfg.eval_stride, progress=cfg.progress
    )


def quiet_hf_progress_bars() -> None:
    """--no-progress also silences the bars transformers and datasets draw while loading."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """Prune `cfg.model` on `cfg.dataset` and write the checkpoint to `cfg.output_dir`; returns the report."""
    from accelerate.utils import DistributedType

    start = time.perf_counter()
    if not cfg.progress:
        quiet_hf_progress_bars()
    accelerator = make_accelerator(cpu=cfg.device == "cpu")  # CPU-only machines: see distributed.py
    # sparsegpt has no criterion entry: it always runs layer-wise, so the registry is not asked
    needs_data = cfg.layer_wise or criteria.get(cfg.criterion).needs_calibration
    if accelerator.is_main_process:
        resolve_model(cfg.model)
    accelerator.wait_for_everyone()  # the main process unpacks a built-in once; the others reuse it
    resolved = resolve_model(cfg.model)
    out = check_output_dir(cfg.output_dir, cfg.overwrite, resolved if _looks_local(resolved) else None)
    check_state(cfg)  # a saved calibration is never silently overwritten

    t = time.perf_counter()
    model, tokenizer, _ = load_model(cfg)
    timings = {"load_model": time.perf_counter() - t}

    t = time.perf_counter()
    batches, calib_hash = None, None
    sharded = uses_fsdp(cfg, accelerator)
    if cfg.eval and sharded:
        raise ConfigError(
            "eval with an FSDP-sharded model is not supported: run llm-gradprune eval on the output"
        )
    if needs_data or cfg.allocation == "owl":
        blocks = load_blocks(cfg, tokenizer)
        calib_hash = token_hash(blocks)
        batches = micro_batches(blocks, cfg.batch_size)
        if not sharded:  # replicated model: each rank its round-robin share of whole micro-batches
            batches = shard_samples(
                batches, cfg.grad_accum, accelerator.process_index, accelerator.num_processes
            )
    timings["load_data"] = time.perf_counter() - t
    checkpointer = (
        checkpointer_for(cfg, model, calib_hash, accelerator) if needs_data and not cfg.layer_wise else None
    )

    device = torch.device(cfg.device) if cfg.device else accelerator.device
    state_dict = None
    dense_eval, held_out = None, None
    if sharded:  # FSDP2: every rank holds some rows of every weight; see sharded.py
        if checkpointer is not None:
            raise ConfigError("checkpoint_every/resume do not work with a sharded (FSDP) model")
        model, result, state_dict = run_sharded(model, batches, cfg, accelerator, device)
    else:
        # prepare() wraps in DDP for any multi-device type, even for one process launched by torchrun
        # (`--num_processes 1` with a multi-GPU config): only a plain single process gets it
        if accelerator.distributed_type == DistributedType.NO and cfg.device is None:
            model = accelerator.prepare(model)  # device placement only: no optimizer, no DDP with one process
        else:
            model.to(device)  # several processes: no DDP wrapper, see calibrate.py
        if cfg.eval and accelerator.is_main_process:  # same windows before and after pruning
            t = time.perf_counter()
            held_out = eval_blocks(cfg, tokenizer, model)
            dense_eval = _eval_now(cfg, model, held_out)
            timings["eval_dense"] = time.perf_counter() - t
        result = prune_(model, batches, cfg, accelerator=accelerator, return_masks=False,
                        num_batches=len(batches) if batches is not None else None,
                        checkpointer=checkpointer)  # fmt: skip
    report = result.report
    timings.update(report.pop("timings_s"))
    report["model"] = cfg.model
    report["dataset"] = {"name": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column}
    report["seed"] = cfg.seed
    report["calibration"]["token_sha256"] = calib_hash
    report["calibration"]["seq_len"] = cfg.seq_len
    if checkpointer is not None:
        report["calibration"]["resumed_from_batch"] = checkpointer.resumed_from
    report["versions"] = versions()
    if held_out is not None:
        t = time.perf_counter()
        pruned_eval = _eval_now(cfg, model, held_out)
        timings["eval_pruned"] = time.perf_counter() - t
        report["eval"] = {
            "dense_ppl": dense_eval["ppl"],
            "pruned_ppl": pruned_eval["ppl"],
            "dense_nll": dense_eval["nll"],
            "pruned_nll": pruned_eval["nll"],
            "tokens": pruned_eval["tokens"],
            "windows": pruned_eval["windows"],
            "split": cfg.eval_split,
            "seq_len": held_out.shape[1],
            "stride": cfg.eval_stride,
            "token_sha256": token_hash(held_out),
        }
    report["timings_s"] = timings

    if accelerator.is_main_process:
        t = time.perf_counter()
        model = accelerator.unwrap_model(model)
        timings["before_save"] = time.perf_counter() - start
        save_pruned(model, tokenizer, cfg, report, out, state_dict=state_dict)
        timings["save_and_verify"] = time.perf_counter() - t  # after the report file: printed only
        report["output_dir"] = str(out)
        if checkpointer is not None:
            checkpointer.clear()  # the checkpoint is in place: the calibration state is no longer needed
    accelerator.wait_for_everyone()
    return report
