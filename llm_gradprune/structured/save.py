"""Saving a shrunk model as a plain folder that stock `AutoModelForCausalLM.from_pretrained` loads.

`shrink_` leaves `model.config` consistent with the weights, so `save_pretrained` writes the right
config; this adds what the project's outputs promise: the folder is written beside its target and
installed atomically (`io.atomic`), and before that its config is re-read by the config class and every
tensor's shape in the safetensors files is checked against the model, so a folder that would fail
`from_pretrained` with size mismatches is never installed; nor is one holding NaN/inf. `manifest.json`,
written last, lists every file with its size and sha256 (what a push sends).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..io.atomic import write_folder, write_json
from ..io.checkpoint import safetensors_files, scan_files
from ..io.manifest import write_manifest

SHAPE_KEYS = ("num_hidden_layers", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
              "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts",
              "n_routed_experts", "mlp_bias", "attention_bias")  # fmt: skip


class SaveCheckError(RuntimeError):
    """The written folder does not hold the shrunk model."""


def check_folder(folder: str | Path, model) -> dict[str, Any]:
    """Re-read config and tensor shapes of a saved folder; raises SaveCheckError on any difference."""
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)  # the config class's own validation runs here
    want = {k: getattr(model.config, k, None) for k in SHAPE_KEYS}
    got = {k: getattr(config, k, None) for k in SHAPE_KEYS}
    if got != want:
        raise SaveCheckError(f"saved config {got} differs from the model's {want}")
    shapes = {}
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    for name, t in model.state_dict().items():
        if name in shapes and shapes[name] != tuple(t.shape):
            raise SaveCheckError(f"saved {name} has shape {shapes[name]}, the model's is {tuple(t.shape)}")
    bad = scan_files(folder).nonfinite
    if bad is not None:
        raise SaveCheckError(f"saved {bad[0]} holds {bad[1]:,} NaN/inf values of {bad[2]:,}")
    return {"tensors": len(shapes), "bytes": sum(f.stat().st_size for f in safetensors_files(folder))}


def save_structured(model, tokenizer, out_dir: str | Path, report: dict | None = None,
                    max_shard_size: int | str = "5GB") -> dict[str, Any]:  # fmt: skip
    """Write model (+ tokenizer, + `structure_report.json`) to `out_dir` atomically; returns what was
    checked (tensors, safetensors bytes). An existing folder is replaced only by a checked one."""

    def fill(tmp: Path) -> dict[str, Any]:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        checked = check_folder(tmp, model)
        if report is not None:
            write_json(tmp / "structure_report.json", {**report, "file_bytes": checked["bytes"]})
        write_manifest(tmp)
        return checked

    return write_folder(out_dir, fill)[1]
