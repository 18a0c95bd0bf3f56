"""Where a layer-wise run keeps the decoder blocks' weights between their turns (`offload`).

- `none`: the whole model is on the device; nothing moves.
- `cpu`: the weights live in host memory. A block is moved to the device for its turn and moved back
  after it; while the blocks' inputs are recorded, the modules outside the blocks that run before them
  (the input embeddings) are on the device.
- `disk`: the model is a skeleton whose parameters are on the meta device (buffers, such as rotary
  frequencies, are real). A block's tensors are read from the model's safetensors files for its turn,
  cast to the run's dtype exactly as `from_pretrained` casts them; after its turn the pruned block is
  written to the output's staging folder as one shard and its weights are dropped again. The tensors
  outside the blocks are read only while needed (the input embeddings while the inputs are recorded)
  and copied file to file into the output at the end. So at most one block is in memory, plus the
  recorded hidden states.

Statistics that need the whole model (gradients, a global budget) are taken on the whole model before
the blocks are released (`release_all`): the plan says so; the layer-wise pass then streams.

Host memory freed must also go back to the system: glibc's malloc raises its mmap threshold (up to
32 MiB) after large frees, so a block's 4-16 MiB tensors then come from the heap, where small objects
allocated between them keep the freed space from being returned; the peak RSS of a disk run varied by
0.46 GiB from one model size to another that way. An offloading store fixes the threshold at 128 KiB
(`mallopt`), so every tensor of that size is its own mapping, unmapped on free (docs/BENCHMARKS.md:
flat 0.81 GiB from 4 to 40 layers, no time cost measured).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

OFFLOADS = ("none", "cpu", "disk")


def _tensor_files(folder: Path) -> dict[str, Path]:
    """{tensor name: file} of a safetensors model folder, from the index or the headers."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            out.update({k: path for k in fh.keys()})
    return out


def _retie(model: nn.Module) -> None:
    """A tied head shares the input embeddings' parameter again after one of them was replaced."""
    if _tied_names(model):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _tied_names(model: nn.Module) -> set[str]:
    """The output head's weight where the config ties it to the input embeddings (saved once, as those)."""
    head = model.get_output_embeddings()
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is head}


MMAP_THRESHOLD = 128 * 1024


def return_freed_memory() -> int | None:
    """glibc: serve allocations of `MMAP_THRESHOLD` bytes and more by their own mappings from now on, so
    that freeing them returns them to the system. The threshold set, or None where it cannot be set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to set
        return None
    m_mmap_threshold = -3  # malloc.h
    return MMAP_THRESHOLD if libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1 else None


class BlockStore:
    """The weights' home between block turns (mode `none` or `cpu`): `fetch` before a block's turn,
    `release` after it, `inputs_side` around the recording of the blocks' inputs."""

    def __init__(self, device: torch.device, mode: str = "none"):
        self.device = torch.device(device)
        self.host = torch.device("cpu")
        self.mode = mode
        self.mmap_threshold = return_freed_memory() if mode != "none" else None

    def outside(self, model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
        """The modules outside the block list that own parameters, but the output head (not run before
        the blocks): the input embeddings, a final norm."""
        head = model.get_output_embeddings()
        out = []
        for name, module in model.named_modules():
            if name == prefix or name.startswith(prefix + ".") or module is head:
                continue
            if any(True for _ in module.parameters(recurse=False)):
                out.append((name, module))
        return out

    def inputs_side(self, model: nn.Module, prefix: str, on: bool) -> None:
        if self.mode == "none":
            return
        for _, module in self.outside(model, prefix):
            module.to(self.device if on else self.host)

    def fetch(self, index: int, block: nn.Module) -> None:
        if self.mode == "cpu":
            block.to(self.device)

    def release(self, index: int, block: nn.Module) -> None:
        """After a block's turn; `index` is its place in the output (layers may have been removed)."""
        if self.mode == "cpu":
            block.to(self.host)

    def drop(self, block: nn.Module) -> None:
        pass

    def release_all(self, model: nn.Module, prefix: str) -> None:
        """After the whole-model statistics: every block back home (cpu: host memory)."""
        if self.mode == "cpu":
            for block in model.get_submodule(prefix):
                block.to(self.host)


class DiskStore(BlockStore):
    """Blocks read from the model's safetensors files and written, pruned, to `staging` one by one."""

    def __init__(self, device: torch.device, source: str | Path, staging: Path | None, dtype: torch.dtype,
                 prefix: str, trust_remote_code: bool = False):  # fmt: skip
        super().__init__(device, "disk")
        self.source = Path(source)
        self.staging = staging
        self.dtype = dtype
        self.prefix = prefix
        self.files = _tensor_files(self.source)
        self.written: dict[str, str] = {}  # tensor -> shard file name
        self.trust_remote_code = trust_remote_code  # the skeleton rebuilt after FSDP2 statistics

    def check(self, model: nn.Module) -> None:
        """Every tensor the model holds must be in the files under its own name (a checkpoint that
        transformers converts on load, e.g. Mixtral's per-expert tensors into fused stacks, is not)."""
        self.model = model
        for name in model.state_dict():
            if name not in self.files and name not in _tied_names(model):
                raise ConfigError(
                    f"offload 'disk' reads each block's tensors by name, but {self.source.name} holds no {name} "
                    "(the model converts its checkpoint on load): use --offload cpu"
                )

    def unsharded(self) -> nn.Module:
        """The model again, as a skeleton, for a layer-wise pass after the whole-model statistics were
        taken on row shards (FSDP2): its blocks are read from the files, whole, one at a time, and the
        output is written from it."""
        self.model = skeleton(self.source, self.dtype, self.trust_remote_code)
        return self.model

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for k in keys:
                    t = fh.get_tensor(k)
                    out[k] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def _load(self, module: nn.Module, name: str, device: torch.device) -> None:
        local = module.state_dict(keep_vars=True)
        tensors = self._read([f"{name}.{k}" for k in local])
        state = {k: tensors[f"{name}.{k}"].to(device) for k in local}
        module.load_state_dict(state, strict=True, assign=True)
        for p in module.parameters():
            p.requires_grad_(False)

    def inputs_side(self, model: nn.Module, prefix: str, on: bool) -> None:
        for name, module in self.outside(model, prefix):
            if on:
                self._load_own(module, name)
            else:
                module.to("meta")
        _retie(model)

    def _load_own(self, module: nn.Module, name: str) -> None:
        """A module's own parameters (not its children's) from the files."""
        own = [k for k, _ in module.named_parameters(recurse=False)]
        tensors = self._read([f"{name}.{k}" if name else k for k in own])
        for k in own:
            t = tensors[f"{name}.{k}" if name else k].to(self.device)
            setattr(module, k, nn.Parameter(t, requires_grad=False))

    def fetch(self, index: int, block: nn.Module) -> None:
        self._load(block, f"{self.prefix}.{index}", self.device)

    def drop(self, block: nn.Module) -> None:
        """Let go of a block's weights unwritten (it was read for its scores only)."""
        block.to("meta")

    def release(self, index: int, block: nn.Module) -> None:
        """Write the pruned block as its own shard, then drop its weights."""
        from safetensors.torch import save_file

        if self.staging is not None:  # several processes hold the same block: the main one writes it
            name = f"{self.prefix}.{index}"
            state = {f"{name}.{k}": v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
            file = f"block-{index:05d}.safetensors"
            save_file(state, str(self.staging / file), metadata={"format": "pt"})
            self.written.update({k: file for k in state})
        block.to("meta")

    def release_all(self, model: nn.Module, prefix: str) -> None:
        """Drop every weight (after whole-model statistics, or on a freshly loaded model)."""
        for module in model.modules():
            for k, p in list(module.named_parameters(recurse=False)):
                if not p.is_meta:
                    setattr(module, k, nn.Parameter(p.to("meta"), requires_grad=False))
        _retie(model)

    def finish(self, model: nn.Module) -> None:
        """Copy the tensors outside the blocks file to file into the last shard, and write the index."""
        from safetensors.torch import save_file

        rest = [n for n in model.state_dict() if n not in self.written and n in self.files]
        file = "rest.safetensors"
        save_file({k: v.contiguous() for k, v in self._read(rest).items()}, str(self.staging / file),
                  metadata={"format": "pt"})  # fmt: skip
        self.written.update({k: file for k in rest})

    def write_weights(self, folder: Path) -> None:
        """The staged shards, the tensors outside the blocks, the index and the config into `folder` (the
        checkpoint being written): what `save_pretrained` would have written for the pruned model."""
        model = self.model
        self.finish(model)
        staged = sorted(set(self.written.values()) - {"rest.safetensors"}) + ["rest.safetensors"]
        names = {f: f"model-{k + 1:05d}-of-{len(staged):05d}.safetensors" for k, f in enumerate(staged)}
        for file in staged:
            os.replace(self.staging / file, folder / names[file])
        self.written = {k: names[f] for k, f in self.written.items()}
        total = sum((folder / f).stat().st_size for f in names.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.written.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(folder)
        if (self.source / "generation_config.json").is_file():
            shutil.copyfile(self.source / "generation_config.json", folder / "generation_config.json")

    def cleanup(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def skeleton(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of a folder with every parameter on the meta device (its buffers real): nothing read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    _retie(model)
    return model.eval()
