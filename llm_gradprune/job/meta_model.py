"""The model without its weights: its config, its skeleton on the meta device, and the shape the memory
model reads off it (`memory.ModelShape`). Nothing here reads a tensor from the weight files; the
safetensors headers give the dtypes and sizes they hold."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..calibration.assets import resolve_model, unreachable_path
from ..errors import ConfigError, hub_unreachable, unreachable
from ..memory import BlockShape, Matrix, ModelShape
from ..models import DTYPES, looks_local
from ..targets import Target, block_list_prefix, weight_rows


def read_config(name: str, trust_remote_code: bool = False):
    """(the transformers config of `name`, its local folder or Hub id), with the one-line errors a real
    run's load gives for a missing folder, a folder without config.json or an unreachable Hub."""
    from transformers import AutoConfig

    path = resolve_model(name)
    local = looks_local(path)
    if local:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            problem = unreachable_path(folder) or "is a file, not a model folder"
            raise ConfigError(
                f"model {name!r} {problem}: give a Hub id, a local folder or builtin:smollm2-135m"
            )
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model folder {name!r} has no config.json: it is not a Hugging Face model folder"
            )
        path = str(folder)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), path
    except Exception as err:  # noqa: BLE001 - every failure to read a config is the user's input
        if not local and unreachable(err):
            raise ConfigError(hub_unreachable("model", name)) from None
        if not isinstance(err, OSError | ValueError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model {name!r} cannot be loaded: {first}") from None


def meta_model(config, dtype: str, trust_remote_code: bool = False, name: str | None = None) -> nn.Module:
    """The model's skeleton on the meta device: every module and parameter shape, no storage."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
            )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            what = f"model {name!r} ({type(config).__name__})" if name else type(config).__name__
            raise ConfigError(f"{what} is not a causal language model") from None
        raise


def stored_bytes(path: str) -> dict[str, int] | None:
    """{safetensors dtype: bytes} of a local folder's weight files, from their headers; None without."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if looks_local(path) else []
    if not files:
        return None
    out: dict[str, int] = {}
    for file in files:
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                kind = piece.get_dtype()
                size = torch.empty((), dtype=_SAFETENSORS.get(kind, torch.uint8)).element_size()
                out[kind] = out.get(kind, 0) + math.prod(piece.get_shape()) * size
    return out


_SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "BOOL": torch.bool}  # fmt: skip


def shared_inputs(model: nn.Module, targets: dict[str, Target], prefix: str) -> dict[str, str]:
    """{target name inside its block: the first target of that block reading the very same input}, from
    one forward on the meta device (no compute). A forward that stops early (experts route tokens by
    value, which the meta device cannot) leaves the targets after it unpaired: each its own input."""
    seen: list[tuple[str, torch.Tensor]] = []  # the inputs stay referenced, so their ids stay unique
    handles = [t.module.register_forward_hook(lambda m, args, out, n=n: seen.append((n, args[0])))
               for n, t in targets.items() if t.expert is None]  # fmt: skip
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except Exception:  # noqa: BLE001,S110 - what ran before the failure is all the pairing needs
        pass
    finally:
        for h in handles:
            h.remove()
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, x in seen:
        rel = _inside(name, prefix)
        out.setdefault(rel, _inside(first.setdefault(id(x), name), prefix))
    return out


def _inside(name: str, prefix: str) -> str:
    """A target's name inside its block: `self_attn.q_proj` for `model.layers.3.self_attn.q_proj`."""
    return name[len(prefix) + 1 :].split(".", 1)[1] if name.startswith(prefix + ".") else name


def model_shape(model: nn.Module, targets: dict[str, Target], name: str) -> ModelShape:
    """The memory model's view of a (meta) model and its targets."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    prefix = block_list_prefix(model)
    if prefix is None:
        raise ConfigError("the model has no list of repeated blocks to read a shape from")
    layers = model.get_submodule(prefix)
    reads = shared_inputs(model, targets, prefix)
    top_k = getattr(config, "num_experts_per_tok", None)
    per_block: list[list[Matrix]] = [[] for _ in layers]
    for t in targets.values():
        if not t.name.startswith(prefix + "."):
            continue
        index, rel = int(t.name[len(prefix) + 1 :].split(".", 1)[0]), _inside(t.name, prefix)
        rows, cols = weight_rows(t.weight)
        if t.expert is None:
            per_block[index].append(Matrix(rows, cols, reads.get(rel, rel)))
        else:  # each expert its own input (its routed tokens); one stage per fused parameter
            routed = min(1.0, top_k / t.param.shape[0]) if top_k else 1.0
            stage = rel.rsplit(".", 2)[0] + "." + t.param_name
            per_block[index].append(Matrix(rows, cols, rel, stage, routed))
    blocks = tuple(
        BlockShape(sum(p.numel() for p in layer.parameters()), tuple(mats))
        for layer, mats in zip(layers, per_block, strict=True)
    )
    distinct = {id(p): p.numel() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight.numel()
    outside = sum(distinct.values()) - sum(b.params for b in blocks)
    heads = getattr(config, "num_attention_heads", 1) or 1
    return ModelShape(name, blocks, outside, embedding, config.hidden_size, config.vocab_size, heads)
