"""Scores on disk, so a global threshold over a 70B model needs one chunk of RAM, not 280 GB.

Each target's fp32 scores are written once, while scoring, to their own safetensors file (one tensor,
keyed by the parameter name, so `safe_open` can inspect them) and a bracketing sample is taken on the
way (`select.Sampler`). Selection then reads the files back chunk by chunk with plain `readinto` calls
into fresh buffers. The files are deliberately not memory-mapped while reading: pages of a mapping
count towards the process's resident memory until it is unmapped, which for one 70B MLP weight is
already 0.9 GB; a read into a chunk-sized buffer keeps resident memory at the chunk.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .select import SAMPLE_CAP, Sampler, flat_chunks


def _header(name: str, shape: tuple[int, ...]) -> bytes:
    numel = 1
    for d in shape:
        numel *= d
    meta = {
        "__metadata__": {"format": "pt", "content": "llm_gradprune fp32 importance scores"},
        name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 4 * numel]},
    }
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


class ScoreStore:
    """fp32 scores of named tensors in a folder of safetensors files, read back in chunks.

    The files go to a fresh temporary folder inside `parent` (the system's temp folder by default),
    removed by `cleanup()` or on leaving a `with` block.
    """

    def __init__(
        self, parent: str | Path | None = None, chunk_elems: int = 1 << 24, *,
        sample_cap: int = SAMPLE_CAP, seed: int = 0,
    ):  # fmt: skip
        if chunk_elems < 1:
            raise ValueError(f"chunk_elems {chunk_elems!r} must be >= 1")
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="llm-gradprune-scores-", dir=parent))
        self.chunk_elems = chunk_elems
        self.sampler = Sampler(sample_cap, seed)
        self.entries: dict[str, tuple[Path, torch.Size, int]] = {}  # name -> (file, shape, data start)

    # -- writing ---------------------------------------------------------------------------------
    def write(self, name: str, scores: torch.Tensor) -> None:
        """Write one tensor's scores (any float dtype, any device), chunk by chunk."""
        self.write_chunks(name, scores.shape, flat_chunks(scores.detach(), self.chunk_elems))

    def write_chunks(self, name: str, shape, chunks) -> None:
        """Write a tensor given as consecutive flat chunks (need not be `chunk_elems` long)."""
        if name in self.entries:
            raise ValueError(f"scores for {name!r} were written already")
        shape = torch.Size(shape)
        path = self.folder / f"{len(self.entries):05d}.safetensors"
        head = _header(name, tuple(shape))
        written = 0
        with open(path, "wb") as fh:
            fh.write(head)
            for c in chunks:
                c = c.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
                self.sampler.add(c)
                fh.write(c.numpy().tobytes() if c.numel() < 4096 else memoryview(c.numpy()))
                written += c.numel()
        if written != shape.numel():
            path.unlink()
            raise ValueError(f"{name}: {written} scores written for a tensor of shape {tuple(shape)}")
        self.entries[name] = (path, shape, len(head))

    # -- reading ---------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(shape.numel() for _, shape, _ in self.entries.values())

    def read_chunks(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor's scores as flat fp32 chunks of `chunk_elems` (the last may be shorter)."""
        path, shape, start = self.entries[name]
        n = shape.numel()
        with open(path, "rb", buffering=0) as fh:
            fh.seek(start)
            for i in range(0, n, self.chunk_elems):
                buf = torch.empty(min(self.chunk_elems, n - i), dtype=torch.float32)
                view = memoryview(buf.numpy()).cast("B")
                got = 0
                while got < len(view):
                    r = fh.readinto(view[got:])
                    if not r:
                        raise OSError(f"{path} ends early: the score file is truncated")
                    got += r
                yield buf

    def read(self, name: str) -> torch.Tensor:
        _, shape, _ = self.entries[name]
        return torch.cat(list(self.read_chunks(name))).view(shape)

    def chunks(self, names: list[str] | None = None) -> Iterator[torch.Tensor]:
        for name in names if names is not None else list(self.entries):
            yield from self.read_chunks(name)

    # -- lifetime --------------------------------------------------------------------------------
    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.entries.clear()

    def __enter__(self) -> ScoreStore:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
