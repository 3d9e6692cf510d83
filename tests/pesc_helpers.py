"""Shared helpers for the PESC tests: a crafted tiny model, its adapter parameters, an independent reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from esft_peft import PESCConfig, PESCLayer
from tiny_dense import make_dense_model

SETTINGS = dict(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0)


def crafted(family: str, seed: int = 0, lora: bool = True, **overrides):
    """A PESC model (with a rank-4 LoRA part unless ``lora=False``) on a tiny dense ``family`` model, and the dense
    model's logits on the test batch."""
    from esft_helpers import logits

    base = make_dense_model(family, seed=seed)
    reference = logits(base)
    config = PESCConfig(**{**SETTINGS, **({"lora_r": 4, "lora_dropout": 0.0} if lora else {}), **overrides})
    return get_peft_model(base, config), reference


def adapter_params(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Trainable-kind parameters of ``adapter``: routers, adapter experts and LoRA matrices."""
    return {
        n: p for n, p in model.named_parameters()
        if any(f".{c}.{adapter}" in n for c in ("pesc_router", "pesc_down", "pesc_up", "pesc_lora_A", "pesc_lora_B"))
    }


def pesc_layers(model: nn.Module) -> dict[str, PESCLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PESCLayer)}


def reference_layer(layer: PESCLayer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """Paper Eq. 7-9 token by token, slot by slot (an implementation independent of the grouped one)."""
    dense = layer.get_base_layer()(x)
    router = layer.pesc_router[adapter].weight
    down, up, scale = layer.pesc_down[adapter], layer.pesc_up[adapter], layer.pesc_scaling[adapter]
    flat_x, flat_h = x.reshape(-1, x.shape[-1]), dense.reshape(-1, dense.shape[-1])
    out = flat_h.clone()
    for t in range(flat_x.shape[0]):
        kept, chosen = (flat_x[t] @ router.T).topk(layer.pesc_router[adapter].top_k)
        weights = torch.softmax(kept, dim=-1)
        for w, e in zip(weights, chosen):
            out[t] = out[t] + w * scale * (up[e] @ F.gelu(down[e] @ flat_h[t]))
    return out.view_as(dense)
