"""Tiny random MoE models of many transformers families, for the test matrix."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

# family -> overrides of COMMON. Expert counts and top-k are small but > 1 so routing matters.
FAMILIES: dict[str, dict] = {
    "modulelist": {},
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1, head_dim=8),
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        decoder_sparse_step=1,
    ),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=16,
        first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy", n_group=1, topk_group=1,
    ),
    "deepseek_v3": dict(
        num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
        first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1,
    ),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=24),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                  mamba_dt_rank=4, use_mamba_kernels=False),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                        intermediate_size_mlp=48, head_dim=8, no_rope_layers=[1, 1], attention_chunk_size=16),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
                         moe_layer_start_index=0, head_dim=8),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, moe_intermediate_size=16, head_dim=8, num_shared_expert=1),
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8, num_key_value_heads=4),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
}


def make_config(family: str, **overrides):
    if family == "modulelist":
        from modulelist_moe import ModuleListMoeConfig

        return ModuleListMoeConfig(**overrides)
    kwargs = {**COMMON, **FAMILIES[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A tiny random model of ``family`` ("modulelist" gives the remote-code-style ModuleList MoE)."""
    if family == "modulelist":
        return make_modulelist_model(seed, dtype)
    torch.manual_seed(seed)
    config = make_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_modulelist_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    from modulelist_moe import ModuleListMoeConfig, ModuleListMoeForCausalLM

    torch.manual_seed(seed)
    return ModuleListMoeForCausalLM(ModuleListMoeConfig()).to(dtype).eval()
