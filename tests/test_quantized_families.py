"""ESFT on a 4-bit base across the tuner matrix: every fused family holds its frozen experts in 4-bit and computes
what the base computes with those experts dequantized; ModuleList experts (Linear4bit, quantized by transformers)
train their selected experts exactly on the dequantized weights; the other layouts keep their experts as loaded."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from esft_peft import ESFTConfig, find_moe_layers
from esft_helpers import batch, delta_params, logits, selection
from quantized_helpers import first_store, force_groups, load_4bit, reference_dequantize, with_dequantized_experts
from tiny_families import FAMILIES

FUSED = [f for f in FAMILIES if f not in ("modulelist", "llama4_text", "jetmoe", "dbrx")]
ATOL = 1e-6  # fp32


def _backward(model) -> None:
    model.train()
    ids = batch(7)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in delta_params(model).values()]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _gradients(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    model.train()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = batch(7)
    torch.manual_seed(0)  # phimoe's router draws jitter in training mode: the same draws for both models
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: param.grad for name, param in delta_params(model).items()}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", FUSED)
def test_fused_family_on_a_4bit_base(monkeypatch, family, checkpointing):
    """A zero adapter on the 4-bit base computes, forward and gradients, what an adapter on the base with each
    unselected expert replaced by its bitsandbytes dequantization computes, with the frozen experts computed in
    groups of two (one call each, dequantized for that call and again in backward)."""
    force_groups(monkeypatch, 4)
    base = load_4bit(family)
    chosen = selection(base)
    model = get_peft_model(base, ESFTConfig(experts=chosen))
    stores = [m for m in model.modules() if type(m).__name__ == "FrozenExperts4bit"]
    assert len(stores) == len(chosen) and all(len(store.groups) > 2 for store in stores)
    reference = with_dequantized_experts(load_4bit(family), chosen)
    expected = logits(reference)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    adapted = get_peft_model(reference, ESFTConfig(experts=chosen, quantize_frozen_experts=False))
    grads, expected_grads = _gradients(model, checkpointing), _gradients(adapted, checkpointing)
    assert grads.keys() == expected_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=ATOL, rtol=0)


def test_modulelist_selected_experts_train_on_their_dequantized_weights():
    base = load_4bit("modulelist")
    reference = logits(base)
    layers = find_moe_layers(base)
    chosen = selection(base)
    model = get_peft_model(base, ESFTConfig(experts=chosen))
    assert first_store(model) is None
    for key, ids in chosen.items():
        for expert in range(layers[key].num_experts):
            proj = model.get_base_model().get_submodule(f"{layers[key].expert_modules[expert]}.gate_proj")
            if expert in ids:  # wrapped, on the nn.Linear holding the dequantized Linear4bit weight
                assert type(proj.get_base_layer()) is torch.nn.Linear
            else:
                assert type(proj).__name__ == "Linear4bit"
    original = load_4bit("modulelist")
    key, ids = next(iter(chosen.items()))
    quantized = original.get_submodule(f"{layers[key].expert_modules[ids[0]]}.up_proj").weight
    linear = model.get_base_model().get_submodule(f"{layers[key].expert_modules[ids[0]]}.up_proj").get_base_layer()
    assert torch.equal(linear.weight, reference_dequantize(quantized.data, quantized.quant_state))
    torch.testing.assert_close(logits(model), reference, atol=ATOL, rtol=0)
    _backward(model)
    with pytest.raises(ValueError, match="Cannot merge an ESFT adapter on a 4-bit base"):
        model.merge_and_unload()


@pytest.mark.parametrize("family", ["llama4_text", "jetmoe", "dbrx"])
def test_other_layouts_keep_their_experts_as_loaded(family):
    base = load_4bit(family)
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    assert first_store(model) is None
    torch.testing.assert_close(logits(model), reference, atol=ATOL, rtol=0)
    _backward(model)
