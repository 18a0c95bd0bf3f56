"""Perplexity on held-out text: exp(mean next-token NLL) over packed, non-overlapping windows."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 1,
    stride: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Perplexity of `model` on token `blocks` [n, seq_len].

    Every window predicts its tokens 1..L-1 from the ones before (the usual shifted labels), so each
    window contributes L-1 scored tokens. With `stride` < seq_len, each block is re-cut into windows
    that overlap by seq_len - stride tokens and only the last `stride` tokens of each later window are
    scored, giving every scored token more context.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    start = time.perf_counter()
    windows = _windows(blocks, stride)
    try:
        for i in tqdm(
            range(0, len(windows), batch_size), desc="perplexity", disable=not progress, unit="batch"
        ):
            ids, first_scored = zip(*windows[i : i + batch_size], strict=True)
            x = torch.stack(ids).to(device)
            logits = model(input_ids=x).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [b, L-1]
            for row, first in zip(nll, first_scored, strict=True):
                scored = row[max(first - 1, 0) :]
                nll_sum += float(scored.double().sum())
                n_tokens += scored.numel()
    finally:
        model.train(was_training)
    mean_nll = nll_sum / max(n_tokens, 1)
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": n_tokens,
        "windows": len(windows),
        "seconds": time.perf_counter() - start,
    }


def _windows(blocks: torch.Tensor, stride: int | None) -> list[tuple[torch.Tensor, int]]:
    """(window ids, index of its first scored token) pairs."""
    seq_len = blocks.shape[1]
    if stride is None or stride >= seq_len:
        return [(b, 1) for b in blocks]
    if stride < 1:
        raise ValueError(f"stride {stride} must be >= 1")
    out: list[tuple[torch.Tensor, int]] = []
    stream = blocks.reshape(-1)
    out.append((stream[:seq_len], 1))
    for end in range(seq_len + stride, stream.numel() + 1, stride):
        out.append((stream[end - seq_len : end], seq_len - stride))
    return out
