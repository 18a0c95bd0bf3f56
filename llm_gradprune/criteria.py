"""Importance scores: pure functions of a weight and its calibration statistics.

Higher score = more important = kept. Each criterion declares the statistics it reads, so calibration
allocates exactly those. Statistics arrive as means over calibration samples: `grad_mean` (E_b[g]),
`grad_abs_mean` (E_b[|g|]), `grad_sq_mean` (E_b[g^2]), over micro-batch gradients g_b, and
`act_sq_mean` (E_t[x_j^2] over tokens t, per input channel j). Weights are [out, in] (conv weights
[out, in, *k] broadcast activation stats over the input channel only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# mean statistic name -> the accumulator it is derived from
MEAN_OF = {
    "grad_mean": "grad_sum",
    "grad_abs_mean": "grad_abs_sum",
    "grad_sq_mean": "grad_sq_sum",
    "act_sq_mean": "act_sq_sum",
    "token_grad_sq_mean": "token_grad_sq_sum",
}


def magnitude(w: torch.Tensor) -> torch.Tensor:
    """|w|: no calibration (Han et al., 2015)."""
    return w.abs()


def gradient(w: torch.Tensor, grad_abs_mean: torch.Tensor) -> torch.Tensor:
    """E_b[|g|]: the classic gradient-pruning recipe; a weight whose gradient is small is pruned.

    It ignores the weight's own size, so it prunes large, important weights that happen to sit at a
    flat point of the loss; offered for comparison, never as a default.
    """
    return grad_abs_mean.clone()


def taylor(w: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
    """|w * E_b[g]|: first-order Taylor estimate of the loss change from setting w to 0.

    dL ~= g . (0 - w) = -g w, averaged over calibration batches before the absolute value (Molchanov
    et al., 2019).
    """
    return (w * grad_mean).abs()


def fisher(w: torch.Tensor, grad_sq_mean: torch.Tensor) -> torch.Tensor:
    """w^2 * E_b[g^2]: Optimal Brain Damage saliency with the empirical diagonal Fisher as Hessian.

    dL ~= 1/2 H_ii w_i^2 with H_ii ~= E_b[g_i^2] (LeCun et al., 1990). It orders weights exactly like
    |w| * sqrt(E_b[g^2]), so that variant is not offered separately.
    """
    return w.square() * grad_sq_mean


def _channel(stat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel vector over a [out, in, *k] weight."""
    return stat.view(1, -1, *([1] * (w.dim() - 2)))


def wanda(w: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """|w_ij| * sqrt(E_t[x_j^2]): weight times the RMS of its input channel (Sun et al., 2023).

    Up to a constant per tensor this is |w_ij| * ||X_j||_2, so rankings within a tensor or a row match
    the paper; using the mean keeps scores comparable across calibration sizes.
    """
    return w.abs() * _channel(act_sq_mean, w).sqrt()


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


def blend(
    w: torch.Tensor,
    act_sq_mean: torch.Tensor,
    grad_sq_mean: torch.Tensor,
    weight_exp: float = 1.0,
    act_exp: float = 1.0,
    grad_exp: float = 0.5,
) -> torch.Tensor:
    """|w|^a * rms(x_j)^b * rms(g)^c: a log-linear blend of the magnitude, activation and gradient terms.

    (a, b, c) = (1, 0, 0) is magnitude, (1, 1, 0) is Wanda, (1, 0, 1) orders like fisher; values in
    between trade layer-local activation evidence against the end-to-end loss sensitivity of gradients.
    The score returned is the logarithm of that product: the same order, and no exponent can overflow
    or underflow fp32.
    """
    tiny = torch.finfo(torch.float32).tiny
    log = weight_exp * w.abs().clamp_min(tiny).log()
    if act_exp:
        log = log + (0.5 * act_exp) * _channel(act_sq_mean, w).clamp_min(tiny).log()
    if grad_exp:
        log = log + (0.5 * grad_exp) * grad_sq_mean.clamp_min(tiny).log()
    return log


def token_fisher(w: torch.Tensor, token_grad_sq_mean: torch.Tensor) -> torch.Tensor:
    """w^2 * E_t[(dL/dy_t,i * x_t,j)^2]: Optimal Brain Damage with the per-token empirical Fisher.

    `fisher` squares each micro-batch gradient, a sum over its tokens in which their contributions
    cancel; here each token's own gradient term is squared before summing, the diagonal Gauss-Newton
    curvature of the loss. Compared with Wanda's w^2 * E_t[x_j^2] it weights every token by how much
    the loss depends on that output channel at that token.
    """
    return w.square() * token_grad_sq_mean


@dataclass(frozen=True)
class Criterion:
    name: str
    fn: Callable[..., torch.Tensor]

    @property
    def needs(self) -> tuple[str, ...]:
        """Mean statistics the function reads, in argument order."""
        code = self.fn.__code__
        return tuple(a for a in code.co_varnames[1 : code.co_argcount] if a in MEAN_OF)

    @property
    def accumulators(self) -> set[str]:
        return {MEAN_OF[s] for s in self.needs}

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs)

    def score(self, w: torch.Tensor, stats: dict[str, torch.Tensor], **params) -> torch.Tensor:
        w = w.detach().to(torch.float32)
        args = [stats[s] for s in self.needs]
        return self.fn(w, *args, **params)


REGISTRY: dict[str, Criterion] = {}


def register(fn: Callable[..., torch.Tensor], name: str | None = None) -> Callable[..., torch.Tensor]:
    crit = Criterion(name or fn.__name__, fn)
    REGISTRY[crit.name] = crit
    return fn


for _fn in (magnitude, gradient, taylor, fisher, wanda, gblm, blend, token_fisher):
    register(_fn)


def get(name: str) -> Criterion:
    if name not in REGISTRY:
        raise KeyError(f"criterion {name!r} is unknown: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]
