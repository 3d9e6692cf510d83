"""A tiny causal LM whose experts are an nn.ModuleList of Linear MLPs, like DeepSeek's own remote-code modeling
file used by the ESFT authors (``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class ModuleListMoeConfig(PreTrainedConfig):
    model_type = "esft_test_modulelist_moe"

    def __init__(self, vocab_size=96, hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, num_hidden_layers=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class DeepseekStyleMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.randn(config.n_routed_experts, config.hidden_size) * 0.1)

    def forward(self, x):
        scores = F.linear(x, self.weight).softmax(-1)
        return torch.topk(scores, self.top_k, dim=-1)


class DeepseekStyleMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = nn.ModuleList(
            DeepseekStyleMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = DeepseekStyleMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        weights, index = self.gate(x)
        out = torch.zeros_like(x)
        for expert_id, expert in enumerate(self.experts):
            token, slot = torch.where(index == expert_id)
            if token.numel():
                out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return (out + self.shared_experts(x)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.token_mix = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)
        self.mlp = DeepseekStyleMoE(config)

    def forward(self, hidden):
        mixed = self.token_mix(self.input_layernorm(hidden))
        hidden = hidden + torch.cumsum(mixed, dim=1) / torch.arange(1, hidden.shape[1] + 1, device=hidden.device)[:, None]
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)


class ModuleListMoeForCausalLM(PreTrainedModel):
    config_class = ModuleListMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden)
        logits = self.lm_head(self.model.norm(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(ModuleListMoeConfig.model_type, ModuleListMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(ModuleListMoeConfig, ModuleListMoeForCausalLM, exist_ok=True)
