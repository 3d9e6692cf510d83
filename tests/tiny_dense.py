"""Tiny random dense models of several transformers families, for the PESC test matrix."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from tiny_families import COMMON

# family -> overrides of COMMON. phi3 fuses gate and up (gate_up_proj); starcoder2 has no gate (c_fc/c_proj).
DENSE_FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "mistral": dict(head_dim=8),
    "phi3": dict(pad_token_id=0),
    "gemma": dict(head_dim=8),
    "olmo2": {},
    "granite": {},
    "starcoder2": {},
}


def make_dense_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A tiny random dense causal LM of ``family``."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**COMMON, **DENSE_FAMILIES[family], **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
