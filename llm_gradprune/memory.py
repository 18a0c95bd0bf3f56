"""The memory model: predicted peak host and device bytes of a run, per offload mode, as named terms.

Pure arithmetic over numbers: a `ModelShape` (blocks of target matrices, parameters outside them) and
`RunSettings` in, bytes out; no tensor is built. `job/meta_model.py` reads a shape off a model built
on the meta device, `facts_shape` off a model's public config facts (`SHAPES`). `predict` gives the
peaks of one offload mode, `check_fits` refuses in one line a run that cannot fit the memory given and
names the option that would make it fit.

A run goes through phases and the peak is the largest phase (b = bytes per weight, P = parameters,
T = target weights, N = processes):

- load: none and cpu build the model in host memory (b P); disk reads one block at a time.
- statistics (only when the criterion or allocation reads the whole model: gradients, per-token Fisher,
  dense activations): the whole model on the device (b P, / N with FSDP) in every offload mode, plus
  its fp32 statistics, the gradient in flight and one micro-batch's activations (`calibration_terms`).
- capture (layer-wise): the recorded block inputs (samples x seq_len x hidden x b, all of them on every
  process; on the host with offload_inputs), next to the whole model (none) or the input embeddings only (cpu, disk).
- layer-wise: one group's fp32 Hessians (in_features^2 x 4 per distinct input: q/k/v share one,
  gate/up share one, each expert its own; one stage's with true_sequential), the recorded inputs and
  one block's forward, next to the whole model (none) or one block (cpu, disk: the device holds the
  block, the host the model (cpu) or the block read from the files and its pruned copy being written
  (disk)). Whole-model statistics follow the weights: on the device with none, on the host otherwise.

On a CPU-only run host and device are one memory: a term both hold (the model, a block, the inputs)
counts once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import ConfigError

GB = 1e9
OFFLOADS = ("none", "cpu", "disk")
PHASES = ("load", "statistics", "capture", "layer-wise", "prune")


@dataclass(frozen=True)
class Matrix:
    """One target matrix [rows, cols]: `reads` names its input (matrices reading one input share a
    Hessian), `stage` its true_sequential stage (default: its input), `routed` the share of tokens it
    sees (an expert: top_k / experts)."""

    rows: int
    cols: int
    reads: str
    stage: str = ""
    routed: float = 1.0


@dataclass(frozen=True)
class BlockShape:
    params: int  # every parameter of the block: targets, norms, routers
    matrices: tuple[Matrix, ...]

    @property
    def targets(self) -> int:
        return sum(m.rows * m.cols for m in self.matrices)

    def _inputs(self) -> dict[str, Matrix]:
        return {m.reads: m for m in reversed(self.matrices)}  # the first reader of each input

    def hessian_bytes(self, true_sequential: bool = False) -> int:
        """fp32 Hessians of one group: the whole block, or its largest stage with true_sequential."""
        stages: dict[str, int] = {}
        for m in self._inputs().values():
            key = (m.stage or m.reads) if true_sequential else ""
            stages[key] = stages.get(key, 0) + 4 * m.cols * m.cols
        return max(stages.values(), default=0)

    def act_per_token(self, hidden: int) -> float:
        """Elements autograd keeps per token for the backward: each distinct input (twice where it is
        narrower or wider than the hidden state: an MLP's activation and product), each output, and
        the two norm inputs; an expert's share of the tokens."""
        inputs = sum(m.cols * m.routed * (1 if m.cols == hidden else 2) for m in self._inputs().values())
        return inputs + sum(m.rows * m.routed for m in self.matrices) + 2 * hidden


@dataclass(frozen=True)
class ModelShape:
    name: str
    blocks: tuple[BlockShape, ...]
    outside: int  # parameters outside the blocks: embeddings, final norm, head (a tied head once)
    embedding: int  # the input embedding's parameters (on the device while inputs are recorded)
    hidden: int
    vocab: int
    heads: int

    @property
    def params(self) -> int:
        return self.outside + sum(b.params for b in self.blocks)

    @property
    def targets(self) -> int:
        return sum(b.targets for b in self.blocks)

    @property
    def largest_block(self) -> BlockShape:
        return max(self.blocks, key=lambda b: b.params)

    @property
    def largest_matrix(self) -> int:
        return max(m.rows * m.cols for b in self.blocks for m in b.matrices)

    def act_per_token(self) -> float:
        return sum(b.act_per_token(self.hidden) for b in self.blocks)


def facts_shape(
    name: str, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int, *,
    tied: bool = False, head_dim: int | None = None, experts: int = 0, top_k: int = 0, moe_inter: int = 0,
) -> ModelShape:  # fmt: skip
    """A Llama-like decoder from public config facts: GQA attention, a gated MLP or `experts` routed
    gated experts (fused gate/up, as transformers 5 stores them) of width `moe_inter`."""
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    mats = [
        Matrix(q, hidden, "attn"),
        Matrix(kv, hidden, "attn"),
        Matrix(kv, hidden, "attn"),
        Matrix(hidden, q, "o"),
    ]
    extra = 2 * hidden
    if experts:
        share = top_k / experts
        for e in range(experts):
            mats += [Matrix(2 * moe_inter, hidden, f"e{e}.in", "experts.in", share),
                     Matrix(hidden, moe_inter, f"e{e}.act", "experts.act", share)]  # fmt: skip
        extra += experts * hidden  # the router
    else:
        mats += [Matrix(inter, hidden, "mlp"), Matrix(inter, hidden, "mlp"), Matrix(hidden, inter, "down")]
    block = BlockShape(sum(m.rows * m.cols for m in mats) + extra, tuple(mats))
    embedding = vocab * hidden
    return ModelShape(
        name, (block,) * layers, embedding * (1 if tied else 2) + hidden, embedding, hidden, vocab, heads
    )


SHAPES = {
    "smollm2-135m": facts_shape("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, tied=True),
    "tinyllama-4l": facts_shape("TinyLlama-1.1B shape, 4 layers", 4, 2048, 5632, 32, 4, 32000),
    "tinyllama-1.1b": facts_shape("TinyLlama-1.1B shape", 22, 2048, 5632, 32, 4, 32000),
    "llama2-7b": facts_shape("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000),
    "llama2-70b": facts_shape("Llama-2-70B", 80, 8192, 28672, 64, 8, 32000),
    "llama3-70b": facts_shape("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256),
    "llama3.1-405b": facts_shape("Llama-3.1-405B", 126, 16384, 53248, 128, 8, 128256),
    "mixtral-8x22b": facts_shape(
        "Mixtral-8x22B", 56, 6144, 16384, 48, 8, 32768, experts=8, top_k=2, moe_inter=16384
    ),  # fmt: skip
    "qwen3-235b-a22b": facts_shape(
        "Qwen3-235B-A22B", 94, 4096, 12288, 64, 4, 151936, head_dim=128, experts=128, top_k=8, moe_inter=1536
    ),  # fmt: skip
}
BIG = ("llama2-7b", "llama3-70b", "llama3.1-405b", "mixtral-8x22b", "qwen3-235b-a22b")


def calibration_terms(
    s: ModelShape, *, b: int, tokens: int, seq: int, variant: str = "ours", stats: int = 1,
    math_attention: bool = False, checkpointing: bool = False, stats_on_host: bool = False,
    shards: int = 1, backward: bool = True, grad_accum: int = 1,
) -> dict[str, float]:  # fmt: skip
    """Bytes on one device (and on the host) for a whole-model statistics pass over one micro-batch of
    `tokens`; `shards` = FSDP ranks sharing P and T; `stats` = fp32 statistics per target weight.

    Activations: b x tokens x the elements a layer keeps per token (`BlockShape.act_per_token`, + 2 heads
    seq with the plain attention of a CPU), + 12 x tokens x vocab (fp32 logits, log-softmax, gradient);
    with gradient checkpointing one hidden state per layer + one layer's full set; a forward-only pass
    keeps one layer's. Gradients in flight: ours one target tensor (b x the largest), a naive loop every
    .grad (b T)."""
    scores = 2 * s.heads * seq if math_attention else 0
    layers = len(s.blocks)
    per_layer = max(b_.act_per_token(s.hidden) for b_ in s.blocks) + scores
    if not backward:
        acts = b * tokens * per_layer + 4 * tokens * s.vocab
    elif checkpointing:
        acts = b * tokens * (layers * s.hidden + per_layer) + 12 * tokens * s.vocab
    else:
        acts = b * tokens * (s.act_per_token() + layers * scores) + 12 * tokens * s.vocab
    out = {"model": b * s.params / shards, "activations": acts}
    if variant == "naive":
        out["gradients"] = b * s.targets / shards
        out["statistics"] = 0.0
    else:
        out["gradients"] = b * s.largest_matrix if backward else 0.0
        out["statistics"] = 0.0 if stats_on_host else 4 * stats * s.targets / shards
        if grad_accum > 1:
            out["gradient sums"] = 4 * s.targets / shards
    if shards > 1:  # FSDP gathers one layer (and prefetches the next) in full
        out["gathered_layers"] = 2 * b * s.largest_block.params
    out["device_total"] = sum(out.values())
    out["host_statistics"] = 4 * stats * s.targets / shards if stats_on_host else 0.0
    return out


def recovery_terms(
    s: ModelShape, *, b: int, tokens: int, seq: int, lora_r: int = 0, checkpointing: bool = False,
    teacher_on_device: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Bytes on one device for masked recovery training (recovery/trainer.py).

    Full: the target weights train, so their gradients (b T) and AdamW's two moments join the model;
    below fp32 (b < 4) the optimizer steps fp32 master copies (4 T) with fp32 moments (8 T) and fp32
    gradients (4 T; each b-byte gradient is freed as it is copied), else the moments are 2 b T. LoRA
    rank r: only the adapters train (r (rows + cols) per target), the frozen base weights form no
    gradient. Both keep the pruned masks (one bool byte per target weight) and the same activations as
    calibration; distillation adds the teacher (b P) unless it sits on the host (`teacher_device: cpu`)."""
    acts = calibration_terms(s, b=b, tokens=tokens, seq=seq, checkpointing=checkpointing)["activations"]
    out = {"model": b * s.params, "masks": 1.0 * s.targets, "activations": acts}
    if lora_r:
        adapters = lora_r * sum(m.rows + m.cols for blk in s.blocks for m in blk.matrices)
        out["adapters+grads+adamw"] = 4 * b * adapters
    else:
        out["gradients"] = max(b, 4) * s.targets
        if b < 4:
            out["fp32 masters"] = 4.0 * s.targets
            out["adamw"] = 8.0 * s.targets
        else:
            out["adamw"] = 2 * b * s.targets
    if teacher_on_device:
        out["teacher"] = b * s.params
    out["device_total"] = sum(out.values())
    return out


# -- the peaks of a pruning run, per offload mode ------------------------------------------------------
@dataclass(frozen=True)
class RunSettings:
    """What a run's memory depends on besides the model's shape (per process)."""

    dtype_bytes: int = 2
    samples: int = 128
    seq_len: int = 2048
    batch_size: int = 1
    layer_wise: bool = True
    weight_stats: int = 0  # fp32 whole-model statistics per target weight (fisher 1, taylor+fisher 2)
    channel_stats: int = 0  # fp32 whole-model statistics per input channel of a target (activations)
    backward: bool = False  # the whole-model pass runs a backward pass
    stats_on_host: bool = False  # stats_device: cpu
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    offload_inputs: bool = False
    # copies of the recorded hidden states: 1, + the block refit's targets, + its dense-model stream
    input_copies: int = 1
    true_sequential: bool = False
    processes: int = 1
    fsdp: bool = False  # the whole-model pass shards the weights over the processes
    math_attention: bool = False  # attention scores kept per token (no flash attention: a CPU)
    device_is_host: bool = False  # a CPU-only run: host and device are one memory

    @property
    def whole_pass(self) -> bool:
        return bool(self.weight_stats or self.channel_stats or self.backward)


@dataclass
class Prediction:
    """Peak host and device bytes of one offload mode, the phase of each peak and its terms."""

    offload: str
    host: float
    device: float
    host_terms: dict[str, float] = field(default_factory=dict)
    device_terms: dict[str, float] = field(default_factory=dict)
    host_phase: str = ""
    device_phase: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self, which: str) -> str:
        """`1.2 GB (layer-wise: block 0.4 GB, ...)`: the peak, its phase and its terms."""
        terms = self.host_terms if which == "host" else self.device_terms
        shown = ", ".join(f"{k} {human(v)}" for k, v in terms.items() if v)
        phase = self.host_phase if which == "host" else self.device_phase
        return f"{human(getattr(self, which))} ({phase}: {shown})" if shown else human(0)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


Phase = tuple[dict[str, float], dict[str, float]]  # (host terms, device terms)


def _statistics_phase(s: ModelShape, r: RunSettings) -> Phase:
    """The whole-model pass: the whole model on the device(s) whatever the offload mode."""
    shards = r.processes if r.fsdp else 1
    c = calibration_terms(s, b=r.dtype_bytes, tokens=r.batch_size * r.seq_len, seq=r.seq_len,
                          stats=r.weight_stats, math_attention=r.math_attention,
                          checkpointing=r.gradient_checkpointing, stats_on_host=r.stats_on_host, shards=shards,
                          backward=r.backward, grad_accum=r.grad_accum)  # fmt: skip
    device = {k: v for k, v in c.items() if k not in ("device_total", "host_statistics")}
    channels = 4 * r.channel_stats * sum(m.cols for blk in s.blocks for m in blk.matrices) / shards
    host = {}
    if r.stats_on_host:
        host["statistics"] = c["host_statistics"] + channels
    else:
        device["statistics"] += channels
    return host, device


def _whole_stats(s: ModelShape, r: RunSettings, blocks: float = 0) -> float:
    """fp32 whole-model statistics (all of them, or `blocks` blocks' share) kept for the layer-wise pass."""
    cols = sum(m.cols for blk in s.blocks for m in blk.matrices)
    total = 4 * (r.weight_stats * s.targets + r.channel_stats * cols)
    return total * blocks / len(s.blocks) if blocks else total


def _layer_phases(s: ModelShape, r: RunSettings, offload: str) -> tuple[Phase, Phase]:
    """(capture, layer-wise) of a layer-wise run."""
    b, block = r.dtype_bytes, s.largest_block
    # every rank records every micro-batch (one process's order)
    inputs = r.input_copies * r.samples * r.seq_len * s.hidden * b
    forward = (
        b
        * r.batch_size
        * r.seq_len
        * (block.act_per_token(s.hidden) + (2 * s.heads * r.seq_len if r.math_attention else 0))
    )
    shards = r.processes if r.fsdp else 1
    stats = _whole_stats(s, r) / shards  # row shards (fsdp): each rank its rows, a block's gathered whole
    held = {"inputs": inputs} if r.offload_inputs else {}
    on_device = {} if r.offload_inputs else {"inputs": inputs}
    hessians = block.hessian_bytes(r.true_sequential)
    if offload == "none":
        weights_dev = {"model": b * s.params}
        if r.stats_on_host:
            held["statistics"] = stats
        else:
            weights_dev["statistics"] = stats
        capture = (dict(held), {**weights_dev, **on_device})
        pruning = (dict(held), {**weights_dev, "hessians": hessians, **on_device, "block forward": forward})
        return capture, pruning
    host = {"model": b * s.params} if offload == "cpu" else {}
    if stats:
        held["statistics"] = stats
    capture_host = {**host, **held} if offload == "cpu" else {"embedding": b * s.embedding, **held}
    capture = (capture_host, {"embedding": b * s.embedding, **on_device})
    if offload == "disk":
        host = {"block": b * block.params, "pruned block": b * block.params}
    dev = {"block": b * block.params, "hessians": hessians, **on_device, "block forward": forward}
    if stats:
        dev["block statistics"] = _whole_stats(s, r, blocks=1)
    return capture, ({**host, **held}, dev)


def _merge(host: dict[str, float], device: dict[str, float]) -> dict[str, float]:
    """One memory (a CPU run): a term both sides name is one object; a block on the 'device' is a view of
    the model or the block the host holds."""
    out = dict(host)
    for k, v in device.items():
        if k == "block" and ("model" in host or "block" in host):
            continue
        out[k] = max(out.get(k, 0.0), v)
    return out


def phases(s: ModelShape, r: RunSettings, offload: str = "none") -> dict[str, Phase]:
    """{phase: (host terms, device terms)} of a run in `offload` mode."""
    b = r.dtype_bytes
    out: dict[str, Phase] = {
        "load": ({"model": b * s.params} if offload != "disk" else {"block": b * s.largest_block.params}, {})
    }
    if r.whole_pass:
        out["statistics"] = _statistics_phase(s, r)
    if r.layer_wise:
        out["capture"], out["layer-wise"] = _layer_phases(s, r, offload)
    else:  # whole-model pruning: the whole model on the device, scored from its statistics
        out["prune"] = (
            {},
            {"model": b * s.params, "statistics": 0.0 if r.stats_on_host else _whole_stats(s, r)},
        )
    if r.device_is_host:
        out = {k: (_merge(h, d), {}) for k, (h, d) in out.items()}
    return out


def predict(s: ModelShape, r: RunSettings, offload: str = "none") -> Prediction:
    """Peak host and device bytes of a run in `offload` mode, with the phase and terms of each peak."""
    ph = phases(s, r, offload)
    host_phase = max(ph, key=lambda k: sum(ph[k][0].values()))
    device_phase = max(ph, key=lambda k: sum(ph[k][1].values()))
    host, device = ph[host_phase][0], ph[device_phase][1]
    p = Prediction(offload, sum(host.values()), sum(device.values()), host, device, host_phase, device_phase)
    if r.whole_pass and offload != "none":
        held = f"1/{r.processes} of it on each" if r.fsdp and r.processes > 1 else "all of it"
        p.notes.append(f"the whole-model statistics pass holds the whole model on the device(s) ({held})")
    return p


FIT_SHARE = 0.9  # of the free memory: the allocator, the CUDA context and Python's own objects take the rest


def fits(p: Prediction, host_free: float, device_free: float | None) -> bool:
    return p.host <= FIT_SHARE * host_free and (device_free is None or p.device <= FIT_SHARE * device_free)


def _options(r: RunSettings, offload: str) -> list[tuple[str, RunSettings, str]]:
    """(what to say, settings, offload mode) that may make a run fit, in the order they are suggested:
    an offload mode, then statistics on the host, then FSDP over more processes."""
    later = [m for m in OFFLOADS[OFFLOADS.index(offload) + 1 :]] if r.layer_wise else []
    out = [(f"--offload {m}", r, m) for m in later]
    if r.weight_stats and r.backward and not r.stats_on_host:
        host = replace(r, stats_on_host=True)
        out += [("stats_device: cpu" + (f" with --offload {m}" if m != offload else ""), host, m)
                for m in [offload, *later]]  # fmt: skip
    if r.whole_pass and not r.device_is_host:
        # a layer-wise pass after sharded statistics reads its blocks from the files
        mode = "disk" if r.layer_wise else offload
        disk = " with --offload disk" if mode != offload else ""
        for n in (2, 4, 8, 16, 32, 64):
            if n > r.processes:
                out.append((f"more processes: --fsdp over {n} (accelerate launch --num_processes {n}){disk}",
                            replace(r, fsdp=True, processes=n), mode))  # fmt: skip
    return out


def check_fits(
    s: ModelShape, r: RunSettings, offload: str, host_free: float, device_free: float | None
) -> Prediction:
    """The prediction of a run that fits what is free; else ConfigError (one line) naming the first
    option that would make it fit. `device_free` None: a CPU run, everything is host memory."""
    p = predict(s, r, offload)
    if fits(p, host_free, device_free):
        return p
    short = []
    if device_free is not None and p.device > FIT_SHARE * device_free:
        short.append(
            f"{human(p.device)} of device memory ({p.device_phase}) where {human(device_free)} are free"
        )
    if p.host > FIT_SHARE * host_free:
        short.append(
            f"{human(p.host)} of host memory ({p.host_phase}) where {human(host_free)} are available"
        )
    need = f"offload {offload!r} needs about " + " and ".join(short)
    for what, settings, mode in _options(r, offload):
        q = predict(s, settings, mode)
        if fits(q, host_free, device_free):
            dev = "" if device_free is None else f"{human(q.device)} device, "
            raise ConfigError(f"{need}: use {what} (about {dev}{human(q.host)} host)")
    raise ConfigError(
        f"{need}: no offload mode, stats_device or process count makes it fit; use a machine with more memory"
    )
