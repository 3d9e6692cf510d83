"""Tiny 4-bit bases for the quantized-base tests: a tiny family model saved and loaded back with bitsandbytes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import bitsandbytes.functional as bnb
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from esft_peft import find_moe_layers
from esft_peft.moe.partitioned import logical_shape
import modulelist_moe  # noqa: F401  (registers the ModuleList family with the Auto classes)
from tiny_families import make_model

_SAVED: dict[tuple, str] = {}


def saved_base(family: str, dtype: torch.dtype = torch.float32) -> str:
    """A folder holding the tiny ``family`` model (saved once per process)."""
    key = (family, dtype)
    if key not in _SAVED:
        folder = tempfile.mkdtemp(prefix=f"esft-4bit-{family}-")
        if family == "modulelist":  # Linear4bit layers read right on CPU only with in_features % 64 == 0
            torch.manual_seed(0)
            config = modulelist_moe.ModuleListMoeConfig(hidden_size=64, moe_intermediate_size=64)
            modulelist_moe.ModuleListMoeForCausalLM(config).to(dtype).save_pretrained(folder)
        else:
            make_model(family, dtype=dtype).save_pretrained(folder)
        _SAVED[key] = folder
    return _SAVED[key]


def bnb_config(**overrides) -> BitsAndBytesConfig:
    settings = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(**{**settings, **overrides})


def load_4bit(family: str, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """The tiny ``family`` model loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4)`` on CPU.

    bitsandbytes' CPU inference path (eval mode, no grad) repacks Linear4bit weights for AVX512-bf16 kernels and
    needs ``in_features`` to be a multiple of the blocksize (64); the tiny models have 32, so that path is switched
    off here (the generic 4-bit matmul runs instead). The experts, which ESFT computes, are unaffected.
    """
    model = AutoModelForCausalLM.from_pretrained(
        saved_base(family, dtype), quantization_config=bnb_config(**overrides), dtype=dtype
    )
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def load_plain(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(saved_base(family, dtype), dtype=dtype).eval()


def fused_weight_names(experts: nn.Module) -> list[str]:
    return [n for n, p in experts.named_parameters(recurse=False) if len(logical_shape(p)) == 3]


def with_dequantized_experts(model: nn.Module, selected: dict[str, list[int]], blocksize: int = 64,
                             quant_type: str = "nf4", double_quant: bool = False) -> nn.Module:
    """``model`` (loaded the same way, experts unquantized) with each unselected expert of the selected layers
    replaced by its bitsandbytes 4-bit round trip: what a zero adapter on the 4-bit base must compute."""
    layers = find_moe_layers(model)
    with torch.no_grad():
        for key, ids in selected.items():
            experts = model.get_submodule(layers[key].experts_name)
            frozen = [e for e in range(layers[key].num_experts) if e not in ids]
            for name in fused_weight_names(experts):
                weight = getattr(experts, name)
                packed, state = bnb.quantize_4bit(weight[frozen].contiguous(), blocksize=blocksize,
                                                  compress_statistics=double_quant, quant_type=quant_type)
                weight[frozen] = reference_dequantize(packed, state)
    return model


def reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """4-bit values times their block's scale, in plain torch (bitsandbytes' format: two values per byte, the first
    in the high nibble; the flat tensor cut in blocks of ``blocksize``): independent of bitsandbytes' kernels."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], dim=1).reshape(-1).long()
    values = state.code.float()[nibbles][: state.shape.numel()]
    scale = absmax.float().repeat_interleave(state.blocksize)[: values.numel()]
    return (values * scale).view(state.shape).to(state.dtype)


def experts_bytes(experts: nn.Module) -> int:
    """Bytes of every tensor the experts module holds (its parameters and buffers, the 4-bit store included)."""
    tensors = list(experts.parameters()) + list(experts.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def first_store(model: nn.Module) -> Optional[nn.Module]:
    return next((m for m in model.modules() if type(m).__name__ == "FrozenExperts4bit"), None)


def force_groups(monkeypatch, groups: int) -> None:
    """Stores created from now on compute a layer's frozen experts in about ``groups`` groups whatever their size (the
    tiny models' layers are otherwise small enough for one call)."""
    from esft_peft.tuners.esft import quantized

    monkeypatch.setattr(quantized, "FROZEN_GROUPS", groups)
    monkeypatch.setattr(quantized, "MIN_GROUP_BYTES", 0)


def store_weight(store, name: str) -> torch.Tensor:
    """The whole ``(num_experts, ...)`` weight a 4-bit store stands for, put together from its groups' rows."""
    whole = None
    for group, ids in enumerate(store.groups):
        if not ids:
            continue
        rows = store.group_rows(name, group)
        if whole is None:
            whole = rows.new_empty(store.shapes[name])
        whole[torch.tensor(ids)] = rows
    return whole
