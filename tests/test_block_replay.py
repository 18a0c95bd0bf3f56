"""Layer-wise mode's replay: every decoder block is run on its own recorded call (mask, rotary embeddings,
...) and the hidden states of the blocks before it, and the last block's output equals the real forward's
on every family, Gemma's sliding and full attention layers included; alike blocks cost no extra forward."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from llm_gradprune.executors.blocks import capture_block_inputs, hidden_states_of, run_block
from llm_gradprune.targets import block_list_prefix

from .families import FAMILIES

VOCAB, SEQ, WINDOW = 128, 16, 4  # the sliding window is shorter than the sequence
SIZES = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

CONFIGS = {  # family: (config class, settings); the flag says whether its blocks are called alike
    "llama": (tf.LlamaConfig, SIZES, True),
    "mistral": (tf.MistralConfig, {**SIZES, "sliding_window": WINDOW}, True),
    "qwen2": (tf.Qwen2Config, SIZES, True),
    "qwen2-sliding": (tf.Qwen2Config, {**SIZES, "use_sliding_window": True, "sliding_window": WINDOW,
                                       "max_window_layers": 2}, False),  # fmt: skip
    "qwen3": (tf.Qwen3Config, {**SIZES, "head_dim": 8}, True),
    "gemma2": (tf.Gemma2Config, {**SIZES, "head_dim": 8, "sliding_window": WINDOW, "layer_types": MIXED}, False),
    "gemma3": (tf.Gemma3TextConfig, {**SIZES, "head_dim": 8, "sliding_window": WINDOW, "layer_types": MIXED}, False),
    "phi3": (tf.Phi3Config, {**SIZES, "pad_token_id": 0}, True),
    "gpt-neox": (tf.GPTNeoXConfig, {k: v for k, v in SIZES.items() if k != "num_key_value_heads"}, True),
    "opt": (tf.OPTConfig, {"vocab_size": VOCAB, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 4,
                           "num_attention_heads": 4, "max_position_embeddings": 64, "word_embed_proj_dim": 32}, True),
    "gpt2": (tf.GPT2Config, {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64}, True),
    "falcon": (tf.FalconConfig, {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4,
                                 "num_attention_heads": 4}, True),
    "falcon-alibi": (tf.FalconConfig, {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4,
                                       "num_attention_heads": 4, "alibi": True}, True),
    "mixtral": (tf.MixtralConfig, {**SIZES, "num_local_experts": 4, "num_experts_per_tok": 2}, True),
    "qwen2-moe": (tf.Qwen2MoeConfig, {**SIZES, **MOE, "num_experts": 4, "shared_expert_intermediate_size": 64}, True),
    "qwen3-moe": (tf.Qwen3MoeConfig, {**SIZES, **MOE, "num_experts": 4, "head_dim": 8}, True),
}  # fmt: skip


def make_model(family: str) -> nn.Module:
    cls, settings, _ = CONFIGS[family]
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cls(**settings), dtype=torch.float32).eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(block_list_prefix(model))


def forward_outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    """The last block's output on each batch in a real forward."""
    seen = []
    hook = decoder_layers(model)[-1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(input_ids=batch)
    hook.remove()
    return seen


def replayed_outputs(model: nn.Module, calls, own_calls: bool = True) -> list[torch.Tensor]:
    """Run the recorded calls through every block in turn, as layer-wise mode does."""
    for index, block in enumerate(decoder_layers(model)):
        if own_calls:
            calls.use_block(index)
        run_block(block, calls, torch.device("cpu"), keep_outputs=True)
    return [hidden_states_of(*c) for c in calls]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], keep=None) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if keep is not None:  # padded positions are left out: their rows attend to nothing
            g, w = g[keep[i]], w[keep[i]]
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))


def id_batches(n: int = 4, per: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randint(0, VOCAB, (n, SEQ), generator=g).split(per))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_block_by_block_replay_matches_the_forward(family):
    model = make_model(family)
    batches = id_batches()
    calls = capture_block_inputs(model, decoder_layers(model), batches, store="cpu")
    assert len(calls) == len(batches) and calls.alike is CONFIGS[family][2]
    assert_same(replayed_outputs(model, calls), forward_outputs(model, batches))


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2-sliding"])
def test_replaying_the_first_blocks_call_for_every_block_is_wrong_where_blocks_differ(family):
    """What layer-wise mode did before: the first block's mask (and rotary embeddings) for every block."""
    model = make_model(family)
    batches = id_batches()
    calls = capture_block_inputs(model, decoder_layers(model)[0], batches)
    assert (
        relative_error(replayed_outputs(model, calls, own_calls=False), forward_outputs(model, batches))
        > 0.05
    )


def padded_batches() -> list[dict]:
    ids = id_batches(4, 4)[0]
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :9] = 0
    return [
        {"input_ids": ids[:2], "attention_mask": mask[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_padded_batches_replay_like_the_forward(family):
    model = make_model(family)
    batches = padded_batches()
    calls = capture_block_inputs(model, decoder_layers(model), batches)
    keep = [b["attention_mask"].bool() for b in batches]
    assert_same(replayed_outputs(model, calls), forward_outputs(model, batches), keep=keep)


def count_calls(block: nn.Module) -> list[int]:
    count = [0]
    block.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize(("family", "runs"), [("llama", 1), ("gemma2", 3)])
def test_alike_blocks_stop_the_forward_at_the_first_block_after_the_first_batch(family, runs):
    model = make_model(family)
    count = count_calls(decoder_layers(model)[1])
    calls = capture_block_inputs(model, decoder_layers(model), id_batches(6, 2))
    assert count[0] == runs and calls.alike is (family == "llama")


def test_a_batch_shaped_otherwise_is_checked_again():
    """Within the window Gemma2's sliding and full masks are equal; a longer batch then records every block."""
    model = make_model("gemma2")
    batches = [id_batches()[0][:, :WINDOW], id_batches()[1]]
    calls = capture_block_inputs(model, decoder_layers(model), batches)
    assert calls.own[0] is None and calls.own[1] is not None
    assert_same(replayed_outputs(model, calls), forward_outputs(model, batches))


def test_equal_inputs_are_stored_once():
    """Offloaded, each distinct input is one tensor: Gemma3's two masks and two rotary embeddings."""
    model = make_model("gemma3")
    calls = capture_block_inputs(model, decoder_layers(model), id_batches(2, 2), store="meta")
    own = calls.own[0]
    assert hidden_states_of(*calls[0]).device.type == "meta"
    for key, distinct in (("attention_mask", 2), ("position_embeddings", 2), ("position_ids", 1)):
        values = [kwargs[key] for _, kwargs in own]
        assert len({id(v) for v in values}) == distinct and values[0] is values[2] and values[1] is values[3]
    assert calls[0][1]["position_ids"] is own[1][1]["position_ids"]
    assert all(t.device.type == "meta" for t in own[1][1]["position_embeddings"])


class Scaled(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h, scale, *, shift):
        return torch.tanh(self.fc(h) * scale + shift)


class Toy(nn.Module):
    """Each block gets a fresh but equal `scale` tensor and its own `shift`."""

    def __init__(self, shifts: list[float], d: int = 8):
        super().__init__()
        self.shifts = shifts
        self.blocks = nn.ModuleList(Scaled(d) for _ in shifts)

    def forward(self, x):
        for block, shift in zip(self.blocks, self.shifts, strict=True):
            x = block(x, torch.full((8,), 0.5), shift=shift)
        return x.sum()


@pytest.mark.parametrize(("shifts", "alike"), [([0.0, 0.0, 0.0], True), ([0.0, 1.0, 0.0], False)])
def test_any_block_signature_equal_values_count_as_alike(shifts, alike):
    torch.manual_seed(0)
    model = Toy(shifts)
    xs = list(torch.randn(3, 2, 8).unbind())
    calls = capture_block_inputs(model, model.blocks, xs, loss_fn=lambda m, x: m(x), store="cpu")
    assert calls.alike is alike
    if not alike:
        assert calls.own[0][0][0][1] is calls.own[0][1][0][1]  # the equal scales are one tensor
    for index, block in enumerate(model.blocks):
        calls.use_block(index)
        run_block(block, calls, torch.device("cpu"), keep_outputs=True)
    for x, (args, _) in zip(xs, calls, strict=True):
        want = x
        for block, shift in zip(model.blocks, shifts, strict=True):
            want = block(want, torch.full((8,), 0.5), shift=shift)
        torch.testing.assert_close(args[0], want)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_layer_wise_wanda_masks_equal_whole_model_masks_behind_a_dense_first_block(family):
    """With block 0 left dense, block 1 reads the dense model's inputs in both modes: same wanda masks."""
    from llm_gradprune import PruneConfig, prune_

    masks = []
    for sequential in (None, True):
        cfg = PruneConfig(criterion="wanda", sparsity=0.5, exclude=[r"layers\.0\."], sequential=sequential,
                          progress=False)  # fmt: skip
        result = prune_(make_model(family), id_batches(8, 2), cfg, return_masks=True)
        masks.append({k: v for k, v in result.masks.items() if ".layers.1." in k})
    assert masks[0] and masks[0].keys() == masks[1].keys()
    for name, mask in masks[0].items():
        assert torch.equal(mask, masks[1][name]), name


def test_shrink_refits_each_layer_on_its_own_call(monkeypatch):
    """Structured shrinking's sequential refit runs every layer on its own mask (Qwen2's sliding layers)."""
    from llm_gradprune.structured import StructureConfig, shrink, shrink_

    model, batches = make_model("qwen2-sliding"), id_batches()
    want = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: want.append(kw["attention_mask"]), with_kwargs=True)
             for layer in decoder_layers(model)]  # fmt: skip
    with torch.no_grad():
        model(input_ids=batches[0])
    for hook in hooks:
        hook.remove()
    seen: dict[int, list] = {}

    def spy(block, calls, device, keep_outputs):
        seen.setdefault(block.self_attn.layer_idx, []).append(calls[0][1]["attention_mask"])
        return run_block(block, calls, device, keep_outputs)

    monkeypatch.setattr(shrink, "run_block", spy)
    shrink_(model, batches, StructureConfig(structure="channels", target_params=0.8), progress=False)
    assert want[0] is None and want[-1] is not None and sorted(seen) == list(range(len(want)))
    for index, masks in seen.items():
        assert all(m is None if want[index] is None else torch.equal(m, want[index]) for m in masks), index


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_of_the_matrix_replays_like_the_forward(family):
    """The family matrix (tests/families.py: gpt-oss, DeepSeek-V3, Llama 4, OLMo2, SmolLM3, Qwen3-Next,
    Granite-MoE-hybrid and the rest), replayed block by block with each block's own call."""
    model = family.build()
    batches = [b % model.config.vocab_size for b in id_batches()]
    calls = capture_block_inputs(model, decoder_layers(model), batches, store="cpu")
    assert_same(replayed_outputs(model, calls), forward_outputs(model, batches))
