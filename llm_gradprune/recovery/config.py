"""Settings of masked recovery training (the `recover:` section of a prune config, or `llm-gradprune recover`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..fields import _f

TEACHER_DEVICES = ("same", "cpu")


def _int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"recover {name} {value!r} must be an integer >= {low}")


def _num(name: str, value: Any, low: float, high: float | None = None, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"recover {name} {value!r} must be a number")
    bad = value <= low if open_low else value < low
    if bad or (high is not None and value > high):
        span = (
            f"({low:g}, {high:g}]"
            if open_low and high is not None
            else f">= {low:g}"
            if high is None
            else f"in [{low:g}, {high:g}]"
        )
        raise ConfigError(f"recover {name} {value!r} must be {span}")
    return float(value)


@dataclass
class RecoverConfig:
    """Masked recovery training after pruning: every pruned weight stays exactly zero."""

    steps: int = _f(0, "optimizer steps of masked training after pruning (0 = no recovery)", "recovery")
    lr: float = _f(1e-4, "peak learning rate of AdamW", "recovery")
    warmup: float = _f(0.1, "share of the steps with a linear warm-up (then cosine decay to 0)", "recovery")
    weight_decay: float = _f(0.0, "AdamW's decoupled weight decay", "recovery")
    batch_size: int = _f(4, "blocks per micro-batch", "recovery")
    grad_accum: int = _f(1, "micro-batches per optimizer step", "recovery")
    seq_len: int | None = _f(None, "tokens per training block (default: the calibration seq_len)", "recovery")
    seed: int = _f(1, "seed of the training block order (calibration uses the job's seed)", "recovery")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 = no clipping)", "recovery")
    bf16: bool | None = _f(
        None, "bf16 autocast (default: on where the device supports it, off on CPU)", "recovery"
    )
    gradient_checkpointing: bool = _f(
        False, "recompute layer activations in backward (less memory)", "recovery"
    )
    distill_alpha: float = _f(
        0.0, "weight of KL(teacher || student) against the LM loss (0 = LM loss only, 1 = distillation only)",
        "recovery",
    )  # fmt: skip
    teacher: str | None = _f(
        None, "teacher model (default: the dense base model the pruned one came from)", "recovery"
    )
    teacher_device: str = _f("same", "where the teacher runs: same (as the student) or cpu", "recovery")
    temperature: float = _f(1.0, "softmax temperature of the distillation loss", "recovery")
    lora_r: int = _f(
        0, "train rank-r LoRA adapters merged back through the mask (0 = train the weights)", "recovery"
    )
    lora_alpha: float | None = _f(None, "LoRA scale numerator (default: 2 x lora_r)", "recovery")
    eval_every: int = _f(0, "held-out perplexity every N steps (0 = before and after only)", "recovery")
    eval_windows: int = _f(16, "held-out windows of each periodic evaluation", "recovery")
    save_state_every: int = _f(0, "save the training state every N steps for resume (0 = never)", "recovery")
    round_steps: int = _f(0, "with rounds: masked training steps after each round but the last", "recovery")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seed", "lora_r", "eval_every", "eval_windows",
                     "save_state_every", "round_steps"):  # fmt: skip
            _int(name, getattr(self, name), 1 if name in ("batch_size", "grad_accum", "eval_windows") else 0)
        if self.seq_len is not None:
            _int("seq_len", self.seq_len, 2)
        self.lr = _num("lr", self.lr, 0.0, open_low=True)
        self.warmup = _num("warmup", self.warmup, 0.0, 1.0)
        self.weight_decay = _num("weight_decay", self.weight_decay, 0.0)
        self.max_grad_norm = _num("max_grad_norm", self.max_grad_norm, 0.0)
        self.distill_alpha = _num("distill_alpha", self.distill_alpha, 0.0, 1.0)
        self.temperature = _num("temperature", self.temperature, 0.0, open_low=True)
        if self.lora_alpha is not None:
            self.lora_alpha = _num("lora_alpha", self.lora_alpha, 0.0, open_low=True)
        if self.teacher_device not in TEACHER_DEVICES:
            raise ConfigError(
                f"recover teacher_device {self.teacher_device!r} is unknown: choose one of same, cpu"
            )
        for name in ("bf16",):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"recover {name} {getattr(self, name)!r} must be true or false")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                f"recover gradient_checkpointing {self.gradient_checkpointing!r} must be true or false"
            )
        if self.teacher is not None and self.distill_alpha == 0:
            raise ConfigError(f"recover teacher {self.teacher!r} is used only with distill_alpha > 0")

    @property
    def distills(self) -> bool:
        return self.distill_alpha > 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
