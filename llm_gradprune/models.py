"""Loading a causal LM (Hub id, local folder or built-in) with one-line errors for every bad input."""

from __future__ import annotations

from pathlib import Path

import torch

from .calibration.assets import resolve_model
from .errors import ConfigError, hub_unreachable, unreachable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_model(cfg, name: str | None = None):
    """(model, tokenizer, local_path_or_id) for a Hub id, a local folder or a built-in alias.

    `cfg` is any config with model, dtype and trust_remote_code (a `JobConfig`)."""
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
    except Exception as err:  # noqa: BLE001 - every failure to read a config is the user's input
        if not _looks_local(path) and unreachable(err):
            raise ConfigError(hub_unreachable("model", name)) from None
        if not isinstance(err, OSError | ValueError):
            raise
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
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"model {name!r} has NaN/inf values in {pname}: refusing to calibrate on it")
    return model, tokenizer, path
