"""Importance scores: pure functions of a weight and its calibration statistics.

Higher score = more important = kept. A criterion is one function and one registration: its signature
names the statistics it reads (so calibration allocates exactly those) and its keyword arguments with
defaults are its parameters (validated, listed in the CLI help and the docs, recorded in the report). Statistics arrive as means over calibration samples: `grad_mean` (E_b[g]),
`grad_abs_mean` (E_b[|g|]), `grad_sq_mean` (E_b[g^2]), over micro-batch gradients g_b, and
`act_sq_mean` (E_t[x_j^2] over tokens t, per input channel j). Weights are [out, in] (conv weights
[out, in, *k] broadcast activation stats over the input channel only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibration.stats import BLOCK_OBJECTIVES, STATISTICS
from ..registry import Param, Registry, resolve_params


@dataclass(frozen=True)
class Criterion:
    """A registered importance score. `fn(w, *statistics, **params)`; None for an adaptive criterion
    whose mask is chosen inside the layer-wise update (sparsegpt)."""

    name: str
    fn: Callable[..., torch.Tensor] | None
    help: str
    formula: str
    params: dict[str, Param] = field(default_factory=dict)
    adaptive: bool = False  # mask chosen by the OBS pass itself; needs layer Hessians
    # mean statistics read from the whole (dense) model depending on the parameters (sparsegpt's prior)
    prior_needs: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
    row_local: bool = True  # a row's scores depend on that row only (else: not on row-sharded weights)

    @property
    def block_local(self) -> bool:
        """Reads statistics that exist one decoder block at a time only: runs layer-wise."""
        return any(STATISTICS.get(s).source in BLOCK_OBJECTIVES for s in self.needs)

    @property
    def needs(self) -> tuple[str, ...]:
        """Mean statistics the score function reads, in argument order."""
        if self.fn is None:
            return ("hessian",)
        code = self.fn.__code__
        return tuple(a for a in code.co_varnames[1 : code.co_argcount] if a in STATISTICS)

    def statistics(self, params: dict[str, Any]) -> set[str]:
        """Every mean statistic a run of this criterion with `params` reads."""
        extra = self.prior_needs(params) if self.prior_needs is not None else ()
        return set(self.needs) | set(extra)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs)

    @property
    def reads_activations(self) -> bool:
        """Scores scale with each layer's input activations: not comparable across layers."""
        return "act_sq_mean" in self.needs

    def resolve_params(self, given: dict[str, Any] | None) -> dict[str, Any]:
        return resolve_params(f"criterion {self.name!r}", self.params, given)

    def score(self, w: torch.Tensor, stats: dict[str, torch.Tensor], **params) -> torch.Tensor:
        if self.fn is None:
            raise TypeError(f"criterion {self.name!r} chooses its mask inside the layer-wise update")
        w = w.detach().to(torch.float32)
        return self.fn(w, *[stats[s] for s in self.needs], **params)


CRITERIA: Registry[Criterion] = Registry("criterion")


def criterion(formula: str, help: str, row_local: bool = True, **param_help: str):
    """Register a score function; its keyword arguments with defaults become its parameters.

    `row_local=False` says a row's scores read other rows too (RIA's column sums)."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        params = {
            k: Param(v.default, param_help.get(k, ""))
            for k, v in sig.parameters.items()
            if v.default is not inspect.Parameter.empty
        }
        CRITERIA.add(fn.__name__, Criterion(fn.__name__, fn, help, formula, params, row_local=row_local))
        return fn

    return wrap


def get(name: str) -> Criterion:
    return CRITERIA.get(name)


@criterion("|w|", "no calibration (Han et al., 2015)")
def magnitude(w: torch.Tensor) -> torch.Tensor:
    """|w|: no calibration (Han et al., 2015)."""
    return w.abs()


@criterion("E_b[|g|]", "the classic small-gradient recipe; ignores the weight itself")
def gradient(w: torch.Tensor, grad_abs_mean: torch.Tensor) -> torch.Tensor:
    """E_b[|g|]: the classic gradient-pruning recipe; a weight whose gradient is small is pruned.

    It ignores the weight's own size, so it prunes large, important weights that happen to sit at a
    flat point of the loss; offered for comparison, never as a default.
    """
    return grad_abs_mean.clone()


@criterion("|w · E_b[g]|", "first-order Taylor loss change of zeroing w (Molchanov et al., 2019)")
def taylor(w: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
    """|w * E_b[g]|: first-order Taylor estimate of the loss change from setting w to 0.

    dL ~= g . (0 - w) = -g w, averaged over calibration batches before the absolute value (Molchanov
    et al., 2019).
    """
    return (w * grad_mean).abs()


@criterion("w² · E_b[g²]", "Optimal Brain Damage with the empirical diagonal Fisher")
def fisher(w: torch.Tensor, grad_sq_mean: torch.Tensor) -> torch.Tensor:
    """w^2 * E_b[g^2]: Optimal Brain Damage saliency with the empirical diagonal Fisher as Hessian.

    dL ~= 1/2 H_ii w_i^2 with H_ii ~= E_b[g_i^2] (LeCun et al., 1990). It orders weights exactly like
    |w| * sqrt(E_b[g^2]), so that variant is not offered separately.
    """
    return w.square() * grad_sq_mean


def _channel(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel vector over a [out, in, *k] weight."""
    return stat.view(1, -1, *([1] * (w.dim() - 2)))


@criterion("|w| · rms(x_j)", "weight times its input channel RMS (Sun et al., 2023)")
def wanda(w: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """|w_ij| * sqrt(E_t[x_j^2]): weight times the RMS of its input channel (Sun et al., 2023).

    Up to a constant per tensor this is |w_ij| * ||X_j||_2, so rankings within a tensor or a row match
    the paper; using the mean keeps scores comparable across calibration sizes.
    """
    return w.abs() * _channel(act_sq_mean, w).sqrt()


@criterion(
    "|w|·rms(x_j) + α·|w|·rms(g)",
    "GBLM-Pruner (Das et al., 2023)",
    alpha="weight of the gradient term against the activation term",
)
def gblm(
    w: torch.Tensor, act_sq_mean: torch.Tensor, grad_sq_mean: torch.Tensor, alpha: float = 100.0
) -> torch.Tensor:
    """|w| * sqrt(E_t[x_j^2]) + alpha * |w| * sqrt(E_b[g^2]) (Das et al., 2023, GBLM-Pruner).

    Normalisation written out: the activation term is the RMS of the input channel over calibration
    tokens, the gradient term the RMS over micro-batches of the gradient of the mean token loss. The
    paper's l2 norms over N tokens / B samples equal these times sqrt(N) / sqrt(B); its alpha was tuned
    for its own scaling (fp16 gradients x100), so ours is tuned on our benchmark instead.
    """
    return w.abs() * (_channel(act_sq_mean, w).sqrt() + alpha * grad_sq_mean.sqrt())


@criterion(
    "|w|^a · rms(x_j)^b · rms(g)^c",
    "log-linear blend of magnitude, activation and gradient terms",
    weight="exponent a of |w|",
    act="exponent b of rms(x)",
    grad="exponent c of rms(g)",
)
def blend(
    w: torch.Tensor,
    act_sq_mean: torch.Tensor,
    grad_sq_mean: torch.Tensor,
    weight: float = 1.0,
    act: float = 1.0,
    grad: float = 0.5,
) -> torch.Tensor:
    """|w|^a * rms(x_j)^b * rms(g)^c: a log-linear blend of the magnitude, activation and gradient terms.

    (a, b, c) = (1, 0, 0) is magnitude, (1, 1, 0) is Wanda, (1, 0, 1) orders like fisher; values in
    between trade layer-local activation evidence against the end-to-end loss sensitivity of gradients.
    The score returned is the logarithm of that product: the same order, and no exponent can overflow
    or underflow fp32.
    """
    tiny = torch.finfo(torch.float32).tiny
    log = weight * w.abs().clamp_min(tiny).log()
    if act:
        log = log + (0.5 * act) * _channel(act_sq_mean, w).clamp_min(tiny).log()
    if grad:
        log = log + (0.5 * grad) * grad_sq_mean.clamp_min(tiny).log()
    return log


@criterion(
    "|w|·(α·E_b|∂‖block(X)‖₂/∂w| + rms(x_j))",
    "regional gradients of one decoder block, Wanda++ RGS (Yang et al., 2025): needs only the block",
    alpha="weight of the regional gradient term against the activation term",
)
def regional(
    w: torch.Tensor, block_grad_abs_mean: torch.Tensor, act_sq_mean: torch.Tensor, alpha: float = 100.0
) -> torch.Tensor:
    """|w| * (alpha * E_b[|d ||block(X_b)||_2 / dw|] + sqrt(E_t[x_j^2])): Wanda's score plus the
    gradient of the block's own output norm, taken in the layer-wise pass on the block's inputs (Wanda++'s
    regional gradient score). No whole-model backward: one block at a time, so any model size that fits
    one block prunes with gradients. Runs layer-wise."""
    return w.abs() * (alpha * block_grad_abs_mean + _channel(act_sq_mean, w).sqrt())


@criterion(
    "w² · E_t[(∂⟨r, block(X)⟩/∂y_t,i · x_t,j)²]",
    "OBD on one decoder block's output: per-token Gauss-Newton curvature from a probe; needs only the block",
)
def block_fisher(w: torch.Tensor, block_token_sq_mean: torch.Tensor) -> torch.Tensor:
    """w^2 * E_t[(J_t^T r)_i^2 x_t,j^2]: Optimal Brain Damage for the squared error of the weight's own
    decoder block output, taken in the layer-wise pass on the block's inputs (J_t: the block output's
    Jacobian in the layer's output at token t; r: a fixed Rademacher probe, so E_r[(J_t^T r)_i^2] is
    diag(J_t^T J_t)_i). `token_fisher` weights every token by the end-to-end loss gradient, which needs the
    whole model's backward; here a token counts by how far the layer's output there moves the block's
    output, so any model one block of which fits prunes with it. Within a row it differs from Wanda's
    w^2 * E_t[x_j^2] by those token weights: down_proj's are all 1 (the residual is the identity), gate,
    up, q, k and v see the nonlinearity, the gate and the attention after them. Runs layer-wise."""
    return w.square() * block_token_sq_mean


@criterion("w² · E_t[(∂L/∂y_t,i · x_t,j)²]", "OBD with the per-token empirical Fisher")
def token_fisher(w: torch.Tensor, token_grad_sq_mean: torch.Tensor) -> torch.Tensor:
    """w^2 * E_t[(dL/dy_t,i * x_t,j)^2]: Optimal Brain Damage with the per-token empirical Fisher.

    `fisher` squares each micro-batch gradient, a sum over its tokens in which their contributions
    cancel; here each token's own gradient term is squared before summing, the diagonal Gauss-Newton
    curvature of the loss. Compared with Wanda's w^2 * E_t[x_j^2] it weights every token by how much
    the loss depends on that output channel at that token.
    """
    return w.square() * token_grad_sq_mean


@criterion(
    "(|w_ij|/Σ_j|w_ij| + |w_ij|/Σ_i|w_ij|) · ‖X_j‖^a",
    "relative importance and activations, RIA (Zhang et al., 2024)",
    row_local=False,
    a="exponent of the input channel's activation norm",
)
def ria(w: torch.Tensor, act_sq_mean: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """Relative importance |w_ij| / sum_j' |w_ij'| + |w_ij| / sum_i' |w_i'j| (the weight against its row
    and against its input column), times the input channel's activation norm to the power a (Zhang et
    al., ICLR 2024, "Plug-and-Play"). rms(x_j)^a differs from ||X_j||^a by one constant per tensor, so
    every ranking within a tensor or a row is the paper's.
    """
    tiny = torch.finfo(torch.float32).tiny
    aw = w.abs()
    rows = aw.reshape(aw.shape[0], -1).sum(dim=1).view(-1, *([1] * (w.dim() - 1)))
    cols = aw.sum(dim=0, keepdim=True)
    return (aw / rows.clamp_min(tiny) + aw / cols.clamp_min(tiny)) * _channel(act_sq_mean, w).pow(a / 2)


SPARSEGPT_PRIORS = {"fisher": ("grad_sq_mean",), "token_fisher": ("token_grad_sq_mean", "act_sq_mean")}

CRITERIA.add(
    "sparsegpt",
    Criterion(
        "sparsegpt",
        None,
        "SparseGPT (Frantar & Alistarh, 2023): mask chosen adaptively inside each column block by the OBS "
        "saliency, the kept weights updated by OBS; layer-wise",
        "w² / [H⁻¹]ⱼⱼ² (H = 2XXᵀ/n per layer)",
        params={
            "grad_exp": Param(
                0.0, "multiply the OBS saliency by a gradient factor to this power (0 = plain)"
            ),
            "prior": Param(
                "fisher",
                "the gradient factor: fisher = E[g^2] per weight; token_fisher = E_t[(dL/dy_i x_j)^2] / E_t[x_j^2]",
                choices=tuple(SPARSEGPT_PRIORS),
            ),
        },
        adaptive=True,
        prior_needs=lambda p: SPARSEGPT_PRIORS[p["prior"]] if p["grad_exp"] else (),
    ),
)


def sparsegpt_prior(stats: dict[str, torch.Tensor], prior: str, grad_exp: float) -> torch.Tensor:
    """The gradient factor multiplying SparseGPT's OBS saliency w^2 / [H^-1]_jj^2, to the power
    `grad_exp`. fisher: E_b[g^2] per weight. token_fisher: E_t[d_t,i^2 x_t,j^2] / E_t[x_t,j^2], the loss
    curvature of output i at the tokens where input j is large: the saliency already holds the input
    energy through H, so only the output side is added (statistics of the dense model)."""
    tiny = torch.finfo(torch.float32).tiny
    if prior == "fisher":
        factor = stats["grad_sq_mean"]
    else:
        factor = stats["token_grad_sq_mean"] / stats["act_sq_mean"].clamp_min(tiny).view(1, -1)
    return factor.clamp_min(tiny).pow(grad_exp)
