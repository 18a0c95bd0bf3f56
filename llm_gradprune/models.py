"""Loading a causal LM (Hub id, local folder or built-in) with one-line errors for every bad input."""

from __future__ import annotations

from pathlib import Path

import torch

from .calibration.assets import resolve_model, unreachable_path
from .errors import ConfigError, hub_unreachable, unreachable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def looks_local(name: str) -> bool:
    # is_symlink: a broken or looping link is still a local path, not a Hub id
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or Path(name).exists()
        or Path(name).is_symlink()
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False, weights: bool = True):
    """(model, tokenizer, local_path_or_id) for a Hub id, a local folder or a built-in alias. Without
    `weights` (offload disk) the model is a skeleton on the meta device; its files are scanned for
    NaN/inf one tensor at a time instead."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    if looks_local(path) and not Path(path).expanduser().is_dir():
        local = Path(path).expanduser()
        problem = unreachable_path(local) or "is a file, not a model folder"
        raise ConfigError(f"model {name!r} {problem}: give a Hub id, a local folder or builtin:smollm2-135m")
    path = str(Path(path).expanduser()) if looks_local(path) else path
    if looks_local(path) and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model folder {name!r} has no config.json: it is not a Hugging Face model folder")
    if looks_local(path) and any(Path(path).glob("*.safetensors*")):
        from .io.inspect import checkpoint_files

        checkpoint_files(Path(path), name)  # an index or a shard that leaves the folder: one line
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - every failure to read a config is the user's input
        if not looks_local(path) and unreachable(err):
            raise ConfigError(hub_unreachable("model", name)) from None
        if not isinstance(err, OSError | ValueError):
            raise
        raise ConfigError(f"model {name!r} cannot be loaded: {_first_line(err)}") from None
    if not weights:
        return _skeleton(name, path, dtype, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
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
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"model {name!r} has NaN/inf values in {pname}: refusing to calibrate on it")
    return model, tokenizer, path


def _front_matter_license(readme: Path) -> str | None:
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def describe_model(name: str) -> dict:
    """What a model card says about the base model: {"hub_id", "name", "license"}; never raises.

    A built-in is its upstream Hub model; a Hub id is itself (license from its card, cached or fetched);
    a local folder has no Hub id, its folder name, and the license of its own README if it has one.
    """
    from .calibration.assets import UPSTREAM

    if name in UPSTREAM:
        up = UPSTREAM[name]
        return {"hub_id": up["hub_id"], "name": up["hub_id"].split("/")[-1], "license": up.get("license")}
    if looks_local(name):
        folder = Path(name).expanduser()
        return {
            "hub_id": None,
            "name": folder.resolve().name,
            "license": _front_matter_license(folder / "README.md"),
        }
    license_ = None
    try:
        from huggingface_hub import hf_hub_download

        license_ = _front_matter_license(Path(hf_hub_download(name, "README.md")))
    except Exception:  # noqa: BLE001 - a missing or unreachable card only leaves the license out
        license_ = None
    return {"hub_id": name, "name": name.split("/")[-1], "license": license_}


def describe_dataset(name: str) -> str | None:
    """The Hub id of a calibration source (a built-in's upstream one), or None for a local file."""
    from .calibration.assets import UPSTREAM

    if name in UPSTREAM:
        return UPSTREAM[name]["hub_id"]
    return None if looks_local(name) or Path(name).suffix else name


def _skeleton(name: str, path: str, dtype: str, trust_remote_code: bool):
    """The model with no weight read (parameters on the meta device), for a local safetensors folder."""
    from transformers import AutoTokenizer

    from .io.checkpoint import scan_files
    from .offload import skeleton

    if not looks_local(path) or not any(Path(path).glob("*.safetensors")):
        raise ConfigError(
            f"offload 'disk' reads a local folder's safetensors files, and model {name!r} has none here"
        )
    bad = scan_files(path).nonfinite
    if bad is not None:
        raise ConfigError(f"model {name!r} has NaN/inf values in {bad[0]}: refusing to calibrate on it")
    model = skeleton(path, DTYPES[dtype], trust_remote_code)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), path
