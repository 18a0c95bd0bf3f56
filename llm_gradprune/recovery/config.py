"""Settings of masked recovery training: `recover_<name>` keys of a prune config, or flags of
`llm-gradprune prune` and `llm-gradprune recover` (`--recover-steps`, `--recover-lr`, ...)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from ..fields import setting, validate

TEACHER_DEVICES = ("same", "cpu")
MAX_LR = 1.0


# every training setting is taken by `prune` (after pruning) and by `recover` (on a pruned folder)
TRAINING: dict[str, Any] = {"section": "recovery", "commands": ("prune", "recover")}


@dataclass
class RecoverConfig:
    """Masked recovery training after pruning: every pruned weight stays exactly zero."""

    flat_prefix: ClassVar[str] = "recover_"

    steps: int = setting(0, "optimizer steps of masked training after pruning (0 = no recovery)", **TRAINING,
                         range=">= 0")  # fmt: skip
    lr: float = setting(1e-4, "peak learning rate of AdamW", **TRAINING, range="> 0")
    warmup: float = setting(0.1, "share of the steps with a linear warm-up (then cosine decay to 0)", **TRAINING,
                            range="[0, 1]")  # fmt: skip
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay", **TRAINING, range=">= 0")
    batch_size: int = setting(4, "samples per micro-batch", **TRAINING, range=">= 1")
    grad_accum: int = setting(1, "micro-batches per optimizer step", **TRAINING, range=">= 1")
    seq_len: int | None = setting(None, "tokens per training block (default: the calibration seq_len)", **TRAINING,
                                  range=">= 2")  # fmt: skip
    seed: int = setting(1, "seed of the training block order (calibration uses the job's seed)", **TRAINING,
                        range=">= 0")  # fmt: skip
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0 = no clipping)", **TRAINING,
                                   range=">= 0")  # fmt: skip
    bf16: bool | None = setting(
        None, "bf16 autocast (default: on where the device supports it, off on CPU)", **TRAINING
    )
    gradient_checkpointing: bool = setting(
        False, "recompute layer activations in backward (less memory)", **TRAINING
    )
    distill_alpha: float = setting(
        0.0, "weight of KL(teacher || student) against the LM loss (0 = LM loss only, 1 = distillation only)",
        **TRAINING, range="[0, 1]",
    )  # fmt: skip
    teacher: str | None = setting(
        None, "teacher model (default: the dense base model the pruned one came from)", **TRAINING,
        unless=(lambda r: r.distill_alpha > 0,
                "is used only with recover_distill_alpha > 0"),
    )  # fmt: skip
    teacher_device: str = setting("same", "where the teacher runs: same (as the student) or cpu", **TRAINING,
                                  choices=TEACHER_DEVICES)  # fmt: skip
    temperature: float = setting(1.0, "softmax temperature of the distillation loss", **TRAINING, range="> 0")
    lora_r: int = setting(
        0, "train rank-r LoRA adapters merged back through the mask (0 = train the weights)", **TRAINING,
        range=">= 0",
    )  # fmt: skip
    lora_alpha: float | None = setting(None, "LoRA scale numerator (default: 2 x lora_r)", **TRAINING,
                                       range="> 0")  # fmt: skip
    # periodic evaluation and saves do not change the trained weights: a resume may change them
    eval_every: int = setting(0, "held-out perplexity every N optimizer steps (0 = before and after only)",
                              **TRAINING, range=">= 0", run_control=True)  # fmt: skip
    eval_windows: int = setting(16, "held-out windows of each periodic evaluation", **TRAINING, range=">= 1",
                                run_control=True)  # fmt: skip
    save_state_every: int = setting(
        0, "save the training state every N optimizer steps for --resume (0 = never)", **TRAINING, range=">= 0",
        run_control=True,
    )  # fmt: skip
    round_steps: int = setting(0, "with rounds: masked training steps after each round but the last", "recovery",
                               range=">= 0")  # fmt: skip

    def __post_init__(self) -> None:
        validate(self)
        if self.lr > MAX_LR:  # AdamW's step lr / (1 - beta1) overflows fp32: a traceback after training
            raise ConfigError(f"recover_lr {self.lr:g} is above {MAX_LR:g}: AdamW would diverge at once")

    @property
    def distills(self) -> bool:
        return self.distill_alpha > 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_lora_rank(lora_r: int, widths: dict[str, int]) -> None:
    """A LoRA rank above a target's narrower side adds parameters but no rank: refused when the model is
    known, naming the narrowest target. `widths`: each target's min(rows, columns)."""
    if not lora_r or not widths:
        return
    name = min(widths, key=lambda n: widths[n])
    if lora_r > widths[name]:
        raise ConfigError(
            f"recover_lora_r {lora_r} is above the width of {name} ({widths[name]}): a rank-r adapter of a "
            f"{widths[name]}-wide layer has rank {widths[name]} at most, use recover_lora_r <= {widths[name]}"
        )
