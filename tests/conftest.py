"""Shared builders: a tiny random Llama made in code (no download) and tokenizer-free blocks of token ids."""

from __future__ import annotations

import torch


def make_tiny_llama(
    seed: int = 0, layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 128
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def make_blocks(n: int = 8, seq_len: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)
