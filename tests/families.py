"""The family matrix: one tiny random causal LM per model family, with its pruning targets written by hand.

    python -m tests.families      # prints, per family, target count, share of decoder matrix weights by kind

Each `Family` is data: a config built in code (transformers 5.25, fp32, no Hub), the decoder-block
prefix, and per block the names the pruning tool must target (read off the modeling code, never computed
by llm_gradprune), the routers it must leave alone and the >=2-D parameters that are not matrices.

Naming convention (the same strings `--include`/`--exclude`, the report and the card use):
- an nn.Linear or GPT-2 Conv1D is its module name: `model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`;
- a fused 3-D expert parameter `experts.gate_up_proj` [E, ...] is one name per expert:
  `model.layers.1.mlp.experts.3.gate_up_proj`;
- a router is named by the module whose `.weight` holds its matrix (`model.layers.0.mlp.gate`).

Kinds: "attention" (every token mixer: softmax attention, and also Qwen3-Next's gated-delta linear
attention and Granite's Mamba-2 in/out projections, which sit in the attention slot of the block),
"mlp" (a dense feed-forward, including DeepSeek/Llama4 dense layers), "experts" (routed experts),
"shared_experts" (an always-on expert beside routed ones: Qwen2-MoE/Qwen3-Next `shared_expert`,
DeepSeek `shared_experts`, Llama4 `shared_expert`, Granite `shared_mlp` when the block has experts).
"other" is unused today.

Not targets, on purpose: routers and gates that choose or weigh experts (Qwen's 1xH `shared_expert_gate`
included), embeddings, norms, lm_head, biases (gpt-oss's 2-D expert biases [E, out] too), and the
depthwise conv1d kernels [C, 1, K] of linear-attention/Mamba layers (a per-channel filter over time, not
a matrix the block multiplies hidden states by). A/D/dt_bias/A_log/sinks are 1-D.

Experts on CPU: every experts class behind `@use_experts_implementation` (all MoE families here but
Llama4) resolves `config._experts_implementation` to "grouped_mm" on CPU too (torch 2.13 has a CPU
kernel): tokens are sorted by expert and one torch grouped matmul runs over the whole [E, ...] parameter,
so no per-expert slice `gate_up_proj[e]` is ever indexed in Python. `model.set_experts_implementation(
"eager")` switches to the per-expert loop of each *Experts.forward with the same outputs (tested), which
is where a hook can see each expert's own tokens. Llama4's experts are not behind the decorator
("eager" is only the config default): one bmm over every expert, each fed all tokens scaled by its
sigmoid router score (0 for experts not in the top-k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ATTN, MLP, EXPERTS, SHARED = "attention", "mlp", "experts", "shared_experts"
KINDS = (ATTN, MLP, EXPERTS, SHARED, "other")

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
GLU = ("gate_proj", "up_proj", "down_proj")
FUSED = ("gate_up_proj", "down_proj")
# tiny token ids every config shares, so generate() never indexes past the small vocab
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

Layer = Callable[[object, int], dict[str, str]]


def _names(prefix: str, names: tuple[str, ...], kind: str) -> dict[str, str]:
    return {f"{prefix}.{n}": kind for n in names}


def _experts(prefix: str, n: int) -> dict[str, str]:
    return {f"{prefix}.{e}.{p}": EXPERTS for e in range(n) for p in FUSED}


def _llama(c, i) -> dict[str, str]:
    return {**_names("self_attn", QKVO, ATTN), **_names("mlp", GLU, MLP)}


def _none(c, i) -> tuple[str, ...]:
    return ()


def expert_slot(name: str) -> tuple[str, int] | None:
    """(fused parameter, expert index) of a per-expert target name, None for a Linear/Conv1D name."""
    parent, _, leaf = name.rpartition(".")
    head, _, idx = parent.rpartition(".")
    if idx.isdigit() and head.endswith("experts"):
        return f"{head}.{leaf}", int(idx)
    return None


def param_of(name: str) -> str:
    """The parameter a target lives in: the fused expert parameter, or `<module>.weight`."""
    slot = expert_slot(name)
    return slot[0] if slot else f"{name}.weight"


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    config: dict
    blocks: str  # dotted name of the decoder-block ModuleList
    layer: Layer  # block config, index -> {name inside the block: kind}
    layer_routers: Callable[[object, int], tuple[str, ...]] = _none
    not_matrices: Callable[[object, int], tuple[str, ...]] = _none  # >=2-D params that are not targets
    conv1d: bool = False  # GPT-2 Conv1D: weight is [in, out]
    transposed_experts: bool = False  # experts stored [E, in, out] (gpt-oss, Llama4)
    notes: str = ""

    def build(self) -> torch.nn.Module:
        import transformers

        config = getattr(transformers, self.config_class)(**{**IDS, **self.config})
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    def _per_block(self, model, fn) -> dict[str, object]:
        c = model.config
        out = {}
        for i in range(c.num_hidden_layers):
            got = fn(c, i)
            items = got.items() if isinstance(got, dict) else ((k, None) for k in got)
            out.update({f"{self.blocks}.{i}.{k}": v for k, v in items})
        return out

    def kinds(self, model) -> dict[str, str]:
        return self._per_block(model, self.layer)

    def expected_targets(self, model) -> list[str]:
        return sorted(self.kinds(model))

    def routers(self, model) -> list[str]:
        return sorted(self._per_block(model, self.layer_routers))

    def excluded_params(self, model) -> list[str]:
        return sorted(self._per_block(model, self.not_matrices))

    def matrix(self, model, name: str) -> torch.Tensor:
        """The target as [out, in] (rows are output channels), a view of the stored weight."""
        slot = expert_slot(name)
        if slot:
            w = model.get_parameter(slot[0])[slot[1]]
            return w.T if self.transposed_experts else w
        w = model.get_submodule(name).weight
        return w.T if self.conv1d else w


def _dims(hidden: int = 32, inter: int = 64, heads: int = 4, kv: int = 2) -> dict:
    return {
        "vocab_size": 128,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 128,
    }


# ----- dense --------------------------------------------------------------------------------------------


def _phi3(c, i):
    return {**_names("self_attn", ("qkv_proj", "o_proj"), ATTN), **_names("mlp", FUSED, MLP)}


def _neox(c, i):
    return {
        **_names("attention", ("query_key_value", "dense"), ATTN),
        **_names("mlp", ("dense_h_to_4h", "dense_4h_to_h"), MLP),
    }


def _opt(c, i):
    return {**_names("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"), ATTN), "fc1": MLP, "fc2": MLP}


def _gpt2(c, i):
    return {**_names("attn", ("c_attn", "c_proj"), ATTN), **_names("mlp", ("c_fc", "c_proj"), MLP)}


def _falcon(c, i):
    return {
        **_names("self_attention", ("query_key_value", "dense"), ATTN),
        **_names("mlp", ("dense_h_to_4h", "dense_4h_to_h"), MLP),
    }


# ----- MoE ----------------------------------------------------------------------------------------------

E = 4  # experts per MoE block, top-2 routed (Llama4: top-1, its only choice)
MOE = {"num_experts_per_tok": 2}


def _mixtral(c, i):
    return {**_names("self_attn", QKVO, ATTN), **_experts("mlp.experts", E)}


def _qwen2_moe(c, i):
    return {**_mixtral(c, i), **_names("mlp.shared_expert", GLU, SHARED)}


def _gpt_oss_excluded(c, i):
    return ("mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias")


def _deepseek(c, i):
    mla = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    attn = _names("self_attn", mla, ATTN)
    if i < c.first_k_dense_replace:
        return {**attn, **_names("mlp", GLU, MLP)}
    return {**attn, **_experts("mlp.experts", E), **_names("mlp.shared_experts", GLU, SHARED)}


def _deepseek_routers(c, i):
    return () if i < c.first_k_dense_replace else ("mlp.gate",)


def _llama4(c, i):
    attn = _names("self_attn", QKVO, ATTN)
    if i not in c.moe_layers:
        return {**attn, **_names("feed_forward", GLU, MLP)}
    return {
        **attn,
        **_experts("feed_forward.experts", E),
        **_names("feed_forward.shared_expert", GLU, SHARED),
    }


def _llama4_routers(c, i):
    return ("feed_forward.router",) if i in c.moe_layers else ()


# ----- hybrid attention ---------------------------------------------------------------------------------


def _qwen3_next(c, i):
    if c.layer_types[i] == "linear_attention":
        mixer = _names("linear_attn", ("in_proj_qkvz", "in_proj_ba", "out_proj"), ATTN)
    else:
        mixer = _names("self_attn", QKVO, ATTN)
    return {**mixer, **_experts("mlp.experts", E), **_names("mlp.shared_expert", GLU, SHARED)}


def _qwen3_next_excluded(c, i):
    return ("linear_attn.conv1d.weight",) if c.layer_types[i] == "linear_attention" else ()


def _granite_hybrid(c, i):
    if c.layer_types[i] == "linear_attention":  # Granite calls its Mamba-2 layers so
        mixer = _names("mamba", ("in_proj", "out_proj"), ATTN)
    else:
        mixer = _names("self_attn", QKVO, ATTN)
    shared = _names("shared_mlp", ("input_linear", "output_linear"), SHARED)
    return {**mixer, **_experts("block_sparse_moe.experts", E), **shared}


def _granite_excluded(c, i):
    return ("mamba.conv1d.weight",) if c.layer_types[i] == "linear_attention" else ()


FAMILIES: tuple[Family, ...] = (
    Family("llama_tied", "LlamaConfig", {**_dims(), "tie_word_embeddings": True}, "model.layers", _llama),
    Family("llama_untied", "LlamaConfig", {**_dims(), "tie_word_embeddings": False}, "model.layers", _llama),
    Family("mistral", "MistralConfig", {**_dims(), "sliding_window": 8}, "model.layers", _llama),
    Family("qwen2", "Qwen2Config", _dims(), "model.layers", _llama, notes="q/k/v carry biases"),
    Family("qwen3", "Qwen3Config", {**_dims(), "head_dim": 8}, "model.layers", _llama),
    Family(
        "gemma2",
        "Gemma2Config",
        {
            **_dims(),
            "head_dim": 8,
            "sliding_window": 8,
            "query_pre_attn_scalar": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "model.layers",
        _llama,
        notes="layer 0 sliding (window 8), layer 1 full; attention and final logit soft-capping on",
    ),
    Family(
        "gemma3",
        "Gemma3TextConfig",
        {
            **_dims(),
            "head_dim": 8,
            "sliding_window": 8,
            "query_pre_attn_scalar": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "model.layers",
        _llama,
        notes="Gemma3ForCausalLM; local rope theta 1e4, global 1e6",
    ),
    Family(
        "phi3",
        "Phi3Config",
        _dims(),
        "model.layers",
        _phi3,
        notes="fused qkv_proj and mlp.gate_up_proj Linears",
    ),
    Family(
        "gpt_neox",
        "GPTNeoXConfig",
        {k: v for k, v in _dims().items() if k != "num_key_value_heads"},
        "gpt_neox.layers",
        _neox,
    ),
    Family(
        "opt",
        "OPTConfig",
        {
            "vocab_size": 128,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 32,
        },
        "model.decoder.layers",
        _opt,
    ),
    Family(
        "gpt2",
        "GPT2Config",
        {"vocab_size": 128, "n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
        "transformer.h",
        _gpt2,
        conv1d=True,
        notes="Conv1D weights are [in, out]",
    ),
    Family(
        "falcon",
        "FalconConfig",
        {
            "vocab_size": 128,
            "hidden_size": 32,
            "ffn_hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
        },
        "transformer.h",
        _falcon,
        notes="multi-query, parallel attention (the 7B layout)",
    ),
    Family(
        "mixtral",
        "MixtralConfig",
        {**_dims(), **MOE, "num_local_experts": E},
        "model.layers",
        _mixtral,
        layer_routers=lambda c, i: ("mlp.gate",),
        notes="experts.gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I]; no bias",
    ),
    Family(
        "qwen2_moe",
        "Qwen2MoeConfig",
        {
            **_dims(),
            **MOE,
            "num_experts": E,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        "model.layers",
        _qwen2_moe,
        layer_routers=lambda c, i: ("mlp.gate", "mlp.shared_expert_gate"),
        notes="Mixtral layout; shared_expert GLU Linears scaled by sigmoid(shared_expert_gate [1, H])",
    ),
    Family(
        "qwen3_moe",
        "Qwen3MoeConfig",
        {
            **_dims(),
            **MOE,
            "head_dim": 8,
            "num_experts": E,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        "model.layers",
        _mixtral,
        layer_routers=lambda c, i: ("mlp.gate",),
        notes="Mixtral layout",
    ),
    Family(
        "gpt_oss",
        "GptOssConfig",
        {
            **_dims(),
            **MOE,
            "head_dim": 8,
            "num_local_experts": E,
            "sliding_window": 8,
            "max_position_embeddings": 131072,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "model.layers",
        _mixtral,
        layer_routers=lambda c, i: ("mlp.router",),
        not_matrices=_gpt_oss_excluded,
        transposed_experts=True,
        notes="experts.gate_up_proj [E, H, 2I] transposed, gate/up interleaved (cols ::2 / 1::2), "
        "biases [E, 2I] and [E, H]; router has a bias; attention sinks",
    ),
    Family(
        "deepseek_v3",
        "DeepseekV3Config",
        {
            **_dims(kv=4),  # MLA has no grouped kv heads
            **MOE,
            "n_routed_experts": E,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4,
            "v_head_dim": 8,
        },
        "model.layers",
        _deepseek,
        layer_routers=_deepseek_routers,
        notes="MLA attention with LoRA-style q/kv; layer 0 dense, layer 1 MoE; Mixtral expert layout; "
        "router weight [E, H] plus e_score_correction_bias",
    ),
    Family(
        "llama4",
        "Llama4TextConfig",
        {
            **_dims(),
            "head_dim": 8,
            "num_experts_per_tok": 1,
            "num_local_experts": E,
            "intermediate_size": 32,
            "intermediate_size_mlp": 64,
            "moe_layers": [1],
            "no_rope_layers": [1, 0],
            "attention_chunk_size": 8,
        },
        "model.layers",
        _llama4,
        layer_routers=_llama4_routers,
        transposed_experts=True,
        notes="Llama4ForCausalLM; experts.gate_up_proj [E, H, 2I] transposed, gate then up; top-1 sigmoid router "
        "(an nn.Linear); layer 0 chunked rope attention + dense MLP, layer 1 NoPE full attention + MoE",
    ),
    Family(
        "olmo2", "Olmo2Config", _dims(), "model.layers", _llama, notes="post-norm, q/k norms over all heads"
    ),
    Family(
        "smollm3",
        "SmolLM3Config",
        {**_dims(), "no_rope_layers": [1, 0]},
        "model.layers",
        _llama,
        notes="layer 1 is NoPE",
    ),
    Family(
        "qwen3_next",
        "Qwen3NextConfig",
        {
            **_dims(),
            **MOE,
            "head_dim": 8,
            "num_experts": E,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 4,
            "layer_types": ["linear_attention", "full_attention"],
        },
        "model.layers",
        _qwen3_next,
        layer_routers=lambda c, i: ("mlp.gate", "mlp.shared_expert_gate"),
        not_matrices=_qwen3_next_excluded,
        notes="layer 0 gated delta-net (in_proj_qkvz, in_proj_ba, depthwise conv1d, out_proj), layer 1 gated "
        "softmax attention (q_proj is 2x wide); Mixtral expert layout + shared expert",
    ),
    Family(
        "granitemoehybrid",
        "GraniteMoeHybridConfig",
        {
            **_dims(),
            **MOE,
            "num_local_experts": E,
            "shared_intermediate_size": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 16,
            "layer_types": ["linear_attention", "full_attention"],
        },
        "model.layers",
        _granite_hybrid,
        layer_routers=lambda c, i: ("block_sparse_moe.router",),
        not_matrices=_granite_excluded,
        notes="layer 0 Mamba-2 (in_proj, depthwise conv1d, out_proj), layer 1 attention; experts Mixtral "
        "layout; shared_mlp input_linear is a fused [2S, H] gate/up",
    ),
)

BY_NAME = {f.name: f for f in FAMILIES}
# wanda 2:4 with a block refit whose masks move (block_mask dynamic): the settings the family and the
# one-vs-two-process tests share
MOVING_2OF4 = {"criterion": "wanda", "pattern": "2:4", "block_steps": 2, "block_lr": 1e-2, "block_batch": 1,
               "block_mask": "dynamic"}  # fmt: skip


def decoder_matrices(model, family: Family) -> dict[str, torch.Tensor]:
    """Every 2-D or 3-D parameter inside the decoder blocks, by parameter name."""
    blocks = model.get_submodule(family.blocks)
    return {f"{family.blocks}.{n}": p for n, p in blocks.named_parameters() if p.dim() in (2, 3)}


def shares(model, family: Family) -> dict[str, float]:
    """Share of the decoder's matrix weights by kind, plus 'routers' and 'excluded'."""
    sizes: dict[str, int] = {}
    for name, kind in family.kinds(model).items():
        sizes[kind] = sizes.get(kind, 0) + family.matrix(model, name).numel()
    sizes["routers"] = sum(model.get_submodule(r).weight.numel() for r in family.routers(model))
    sizes["excluded"] = sum(model.get_parameter(p).numel() for p in family.excluded_params(model))
    total = sum(p.numel() for p in decoder_matrices(model, family).values())
    return {k: v / total for k, v in sizes.items()}


def _summary() -> None:
    for fam in FAMILIES:
        model = fam.build()
        share = ", ".join(f"{k} {v:.1%}" for k, v in shares(model, fam).items() if v)
        print(
            f"{fam.name}: {len(fam.expected_targets(model))} targets; {share}; routers "
            f"{fam.routers(model)}; experts_implementation {model.config._experts_implementation}"
        )


_DENSE = ("channels", "heads", "layers")
_MOE = (*_DENSE, "experts")
# the structures structured pruning offers per family (issue 24); every other family is refused in one line
STRUCTURED = {"llama_tied": _DENSE, "llama_untied": _DENSE, "mistral": _DENSE, "qwen2": _DENSE, "qwen3": _DENSE,
              "gemma2": _DENSE, "gemma3": _DENSE, "phi3": _DENSE, "olmo2": ("channels", "layers"), "smollm3": _DENSE,
              "mixtral": _MOE, "qwen2_moe": _MOE, "qwen3_moe": _MOE}  # fmt: skip


def markdown_table() -> str:
    """The per-family table of docs/FAMILIES.md, from what the tool itself targets (find_targets)."""
    from llm_gradprune.targets import all_matrices, find_targets

    rows = [
        "| family | targets | pruned share of decoder matrix weights | by kind | routers (never pruned) | structured |",
        "|---|---|---|---|---|---|",
    ]
    for fam in FAMILIES:
        model = fam.build()
        total = sum(p.numel() for p in decoder_matrices(model, fam).values())
        targets = find_targets(model)
        per_kind: dict[str, int] = {}
        for t in targets.values():
            per_kind[t.kind] = per_kind.get(t.kind, 0) + t.weight.numel()
        pruned = sum(per_kind.values())
        kinds = ", ".join(f"{k.replace('_', ' ')} {v / total:.1%}" for k, v in per_kind.items())
        routers = all_matrices(model)[1]
        router_share = sum(model.get_parameter(r).numel() for r in routers) / total
        router_text = f"{len(routers)} ({router_share:.1%})" if routers else "-"
        structured = ", ".join(STRUCTURED[fam.name]) if fam.name in STRUCTURED else "refused (one line)"
        rows.append(
            f"| {fam.name} | {len(targets)} | {pruned / total:.1%} | {kinds} | {router_text} | {structured} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    print(markdown_table(), end="") if "--markdown" in sys.argv else _summary()
