"""Running a model one decoder block at a time, for layer-wise mode, with no assumption on its blocks.

The calibration batches run through the model with a forward pre-hook on every decoder block; each hook
records its block's own call (positional inputs and keyword arguments: hidden states, rotary embeddings,
attention mask, position ids, ...), since blocks of one model may be called differently (Gemma's sliding
and full attention layers get different masks, Gemma3's also different rotary embeddings). The first
micro-batch runs through every block but the last; when every block got the same inputs besides the
hidden states, later micro-batches of the same shapes stop at the first block, as a model of alike blocks
needs no more. Equal inputs are kept once, whichever blocks share them. The replay (`run_block`) feeds
each block its own recorded inputs (`BlockCalls.use_block`) and the hidden states the blocks before it
computed; inputs other than the hidden states are those of the dense forward. Nothing is assumed about a
block's signature; only a KV cache is dropped, since blocks are re-run. `call_stages` finds a block's
stages (modules reading one input: q/k/v, then o, gate/up, down) by watching one forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..calibration.loop import LossFn, causal_lm_loss, to_device
from ..errors import ConfigError

Call = tuple[tuple, dict]  # the (args, kwargs) of one block call


class _StopForward(Exception):
    """Raised by the capture hook once the blocks' inputs a micro-batch needs are recorded."""


def _drop_cache(value: Any) -> Any:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return value
    return None if isinstance(value, Cache) else value


def _move(obj: Any, device: torch.device | str) -> Any:
    return to_device(obj, torch.device(device))


def _same(a: Any, b: Any) -> bool:
    """Whether two recorded inputs are equal: the same object, or equal values of the same structure."""
    if a is b:
        return True
    (la, sa), (lb, sb) = tree_flatten(a), tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if (x.shape, x.dtype, x.device) != (y.shape, y.dtype, y.device) or not torch.equal(x, y):
                return False
        elif x is not y:
            try:
                if not bool(x == y):
                    return False
            except Exception:  # a value with no truth value for == is not known to be equal
                return False
    return True


def _signature(call: Call) -> tuple:
    """What a micro-batch's first block call looks like: structure, tensor shapes and plain values."""
    leaves, spec = tree_flatten(call)
    plain = (type(None), bool, int, float, str)
    return spec, [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else x if isinstance(x, plain) else type(x)
                  for x in leaves]  # fmt: skip


def _share(calls: list[Call]) -> list[Call]:
    """The blocks' calls with each input replaced by an equal one an earlier block got in the same place
    (an argument position or keyword), so that equal inputs are one object and are stored once."""
    kept: dict[int | str, list] = {}

    def one(slot: int | str, value: Any) -> Any:
        for earlier in kept.setdefault(slot, []):
            if _same(earlier, value):
                return earlier
        kept[slot].append(value)
        return value

    return [
        (tuple(one(p, v) for p, v in enumerate(args)), {k: one(k, v) for k, v in kwargs.items()})
        for args, kwargs in calls
    ]


def _identical(a: Call, b: Call) -> bool:
    return (len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0], strict=True))
            and a[1].keys() == b[1].keys() and all(a[1][k] is b[1][k] for k in a[1]))  # fmt: skip


def _mover(device: torch.device | str | None):
    """A function moving inputs to `device` (None: leaving them), each input and each tensor in it once
    however often it appears, so that what the blocks share stays one object (the originals are kept
    too, so that their ids stay theirs)."""
    if device is None:
        return lambda value: value
    moved: dict[int, tuple[Any, Any]] = {}

    def once(x: Any, move) -> Any:
        if id(x) not in moved:
            moved[id(x)] = (x, move(x))
        return moved[id(x)][1]

    def tensor(x: Any) -> Any:
        return once(x, lambda t: _move(t, device)) if isinstance(x, torch.Tensor) else x

    return lambda value: once(value, lambda v: tree_map(tensor, v))


def _map_call(f, call: Call) -> Call:
    args, kwargs = call
    return tuple(f(v) for v in args), {k: f(v) for k, v in kwargs.items()}


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a recorded decoder-block call passes (first positional, or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, h: torch.Tensor | None) -> Call:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


class BlockCalls(list):
    """The recorded block calls, one (args, kwargs) per micro-batch, as the block being run takes them.

    `run_block` replaces their hidden states by a block's outputs; `use_block(i)` swaps in block i's own
    other inputs (mask, rotary embeddings, ...) and keeps the hidden states, so call it before running
    block i. `own[j]` lists micro-batch j's calls per block without hidden states, or is None where every
    block got the same inputs.
    """

    def __init__(self, calls: Iterable[Call] = (), own: list[list[Call] | None] | None = None):
        super().__init__(calls)
        self.own = own if own is not None else [None] * len(self)

    @property
    def alike(self) -> bool:
        """Whether every block was called with the same inputs besides the hidden states."""
        return all(o is None for o in self.own)

    def use_block(self, index: int) -> None:
        """Give every call block `index`'s own inputs besides the hidden states."""
        for j, own in enumerate(self.own):
            if own is not None:
                self[j] = with_hidden(*own[index], hidden_states_of(*self[j]))


class _Recorder:
    """Forward pre-hooks on the blocks: each records its block's call and stops the forward at the last
    block, or at the first block once a micro-batch of that shape showed every block called alike."""

    def __init__(self, n_blocks: int):
        self.last = n_blocks - 1
        self.seen: list[Call] = []  # this micro-batch's calls, hidden states left out
        self.hidden: torch.Tensor | None = None
        self.signature: tuple | None = None
        self.alike_signatures: list[tuple] = []
        self.blocks_differ = False

    def hook(self, index: int):
        def record(module, args, kwargs):
            if index != len(self.seen):
                raise RuntimeError(
                    f"block {index} was called before block {len(self.seen)}: layer-wise mode replays the "
                    "blocks in list order, each once"
                )
            kwargs = {k: _drop_cache(v) for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            call = (tuple(args), kwargs)
            if index == 0:
                self.hidden, self.signature = hidden_states_of(*call), _signature(call)
            self.seen.append(with_hidden(*call, None))
            if index == self.last or (index == 0 and self._known_alike()):
                raise _StopForward

        return record

    def _known_alike(self) -> bool:
        return not self.blocks_differ and any(self.signature == s for s in self.alike_signatures)

    def finish(self, store: torch.device | str | None) -> tuple[Call, list[Call] | None]:
        """This micro-batch's first block call, and the calls of every block where they differ."""
        seen, self.seen = self.seen, []
        own: list[Call] | None = None
        if len(seen) > 1:
            shared = _share(seen)
            if all(_identical(c, shared[0]) for c in shared):
                self.alike_signatures.append(self.signature)
            else:
                self.blocks_differ = True
                own = [shared[0] if _identical(c, shared[0]) else c for c in shared]
        move = _mover(store)
        own = None if own is None else [_map_call(move, c) for c in own]
        base = own[0] if own is not None else _map_call(move, seen[0])
        hidden, self.hidden = move(self.hidden), None
        return with_hidden(*base, hidden), own


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    layers: Sequence[nn.Module] | nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn = causal_lm_loss,
    device: torch.device | None = None,
    store: torch.device | str | None = None,
    stubbed: bool = False,
) -> BlockCalls:
    """Every block's call for every batch, moved to `store` (default: left where they come).

    `layers`: the decoder blocks in call order (one block: that block's calls only). The forward stops
    at the last block's call, or at the first one's where the blocks are known to be called alike.
    `stubbed`: the blocks do not run (their weights are elsewhere, `offload`): each passes its hidden
    states on, so every block's own inputs are still recorded; only block 0's hidden states are kept.
    """
    device = device or next(model.parameters()).device
    blocks = list(layers) if isinstance(layers, nn.ModuleList | list | tuple) else [layers]
    recorder = _Recorder(len(blocks))
    handles = [b.register_forward_pre_hook(recorder.hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    if stubbed:
        for b in blocks:
            b.forward = _pass_hidden
    calls = BlockCalls()
    config = getattr(model, "config", None)
    old_cache = getattr(config, "use_cache", None)
    if old_cache is not None:
        config.use_cache = False
    try:
        for batch in batches:
            try:
                loss_fn(model, to_device(batch, device))
            except _StopForward:
                first, own = recorder.finish(store)
                calls.append(first)
                calls.own.append(own)
                continue
            raise RuntimeError(
                f"the model finished a forward pass without calling its block {len(recorder.seen)}"
            )
    finally:
        for handle in handles:
            handle.remove()
        if stubbed:
            for b in blocks:
                del b.forward  # the class's own forward again
        if old_cache is not None:
            config.use_cache = old_cache
    return calls


def capture_with_store(
    model: nn.Module, prefix: str, layers, batches, loss_fn, device, store, host=None
) -> BlockCalls:
    """Every block's recorded inputs (`capture_block_inputs`) when the blocks live in an
    `offload.BlockStore`: offloaded, only what runs before the blocks is brought in and the blocks are
    stubbed; `host`: where the recorded inputs are kept (None: where they come)."""
    if store.mode == "none":
        return capture_block_inputs(model, layers, batches, loss_fn=loss_fn, device=device, store=host)
    store.inputs_side(model, prefix, True)
    try:
        return capture_block_inputs(
            model, layers, batches, loss_fn=loss_fn, device=device, store=host, stubbed=True
        )
    finally:
        store.inputs_side(model, prefix, False)


def _pass_hidden(*args, **kwargs):
    return hidden_states_of(args, kwargs)


@torch.no_grad()
def run_block(
    block: nn.Module, calls: list[tuple[tuple, dict]], device: torch.device, keep_outputs: bool
) -> None:
    """Run every recorded call through `block`; with `keep_outputs`, its outputs replace the hidden states."""
    for i, (args, kwargs) in enumerate(calls):
        store = hidden_states_of(args, kwargs).device
        a, kw = _move(args, device), _move(kwargs, device)
        out = block(*a, **kw)
        if keep_outputs:
            h = out[0] if isinstance(out, tuple | list) else out
            calls[i] = with_hidden(args, kwargs, h.to(store))


def probe(shape: torch.Size, index: int, device: torch.device) -> torch.Tensor:
    """The fixed Rademacher probe (+-1 per element) of the `index`-th recorded call: every rank and every
    run draws the same one (seeded by the index, on the CPU), so the statistic is deterministic."""
    gen = torch.Generator().manual_seed(0x5EED + index)
    return (torch.randint(0, 2, shape, generator=gen, dtype=torch.int8) * 2 - 1).to(device, torch.float32)


def run_block_backward(
    block: nn.Module, calls: list[tuple[tuple, dict]], device: torch.device, objective: str = "norm"
) -> None:
    """Each recorded call through `block` with autograd, then the backward of a block-local objective,
    folded by whatever gradient hooks are attached (only what requires grad gets one):

    - `norm`: the sum over samples of the l2 norm of the block's output (each sample's tokens x hidden),
      the regional gradient of Wanda++;
    - `probe`: <r, block output> with a fixed Rademacher probe r per call (`probe`). The gradient it gives
      a layer's output y_t at token t is J_t^T r, and E_r[(J_t^T r)_i^2] is the i-th diagonal entry of
      J_t^T J_t: squared per token, the Gauss-Newton curvature of the block output's squared error
      (Hutchinson's estimator; exact where the block output is the layer's output plus a residual, as
      for down_proj, whose J_t is the identity). One probe per call: four measured the same on the
      quality protocol (docs/BENCHMARKS.md) at four backward passes.
    """
    if objective not in ("norm", "probe"):
        raise ValueError(f"unknown block objective {objective!r}")
    for index, (args, kwargs) in enumerate(calls):
        with torch.enable_grad():
            out = block(*_move(args, device), **_move(kwargs, device))
            h = (out[0] if isinstance(out, tuple | list) else out).float()
            if objective == "norm":
                loss = h.flatten(1).norm(dim=1).sum()
            else:
                loss = (h * probe(h.shape, index, h.device)).sum()
        loss.backward()


@torch.no_grad()
def dense_outputs(
    block: nn.Module, calls: list[tuple[tuple, dict]], device: torch.device
) -> list[torch.Tensor]:
    """The block's outputs for every recorded call, kept where the calls' hidden states are."""
    out = []
    for args, kwargs in calls:
        store = hidden_states_of(args, kwargs).device
        h = block(*_move(args, device), **_move(kwargs, device))
        out.append((h[0] if isinstance(h, tuple | list) else h).to(store))
    return out


class _StageInputsSeen(Exception):
    """Raised by a hook to stop a block's forward once a stage's last module has read its input."""


def run_block_until(block: nn.Module, calls: list[tuple[tuple, dict]], device, module: nn.Module) -> None:
    """Run every recorded call through `block` only up to (and including) `module`; outputs are dropped."""

    def stop(*_):
        raise _StageInputsSeen

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                try:
                    block(*_move(args, device), **_move(kwargs, device))
                except _StageInputsSeen:
                    pass
    finally:
        handle.remove()


def call_stages(
    block: nn.Module, modules: dict[str, nn.Module], calls: list[tuple[tuple, dict]], device
) -> list[list[str]]:
    """The block's target modules in call order, grouped into stages of modules that read the very same
    input tensor (found by running `calls`, normally one sample, with recording hooks)."""
    stages: list[list[str]] = []
    last: list = [None]

    def make_hook(name: str):
        def hook(mod, inputs, output) -> None:
            if any(name in g for g in stages):
                return
            if last[0] is not None and inputs[0] is last[0] and stages:
                stages[-1].append(name)
            else:
                stages.append([name])
            last[0] = inputs[0]

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_block(block, calls, device, keep_outputs=False)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if not any(n in g for g in stages)]
    if missing:
        raise RuntimeError(f"true_sequential: target {missing[0]!r} was never called by its block")
    return stages


def split_by_block(targets: dict[str, nn.Module], prefix: str, n_blocks: int) -> list[dict[str, nn.Module]]:
    per: list[dict[str, nn.Module]] = [{} for _ in range(n_blocks)]
    for name, module in targets.items():
        rest = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None
        index = rest.split(".", 1)[0] if rest else None
        if index is None or not index.isdigit():
            raise ConfigError(
                f"target {name!r} is outside the block list {prefix!r}: layer-wise mode prunes block targets only"
            )
        per[int(index)][name] = module
    return per
