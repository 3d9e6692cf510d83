"""The paper's Table 3 variants: shared experts, non-expert modules, router."""

import pytest
import torch
from peft import get_peft_model

from esft_peft import ESFTConfig, ModuleDeltaLayer, find_moe_layers
from esft_helpers import delta_params, logits, selection, train_steps
from tiny_families import make_model

SHARED_FAMILIES = ["qwen2_moe", "deepseek_v2", "deepseek_v3", "granitemoeshared", "llama4_text", "ernie4_5_moe",
                   "hunyuan_v1_moe", "modulelist"]


@pytest.mark.parametrize("family", SHARED_FAMILIES)
def test_shared_experts_get_trained_deltas(family):
    base = make_model(family)
    reference = logits(base)
    layers = find_moe_layers(base)
    experts = selection(base)
    model = get_peft_model(base, ESFTConfig(experts=experts, train_shared_experts=True))
    assert torch.equal(logits(model), reference)
    shared = [n for key in experts for n in layers[key].shared_names]
    assert shared
    trainable = delta_params(model)
    for name in shared:
        assert any(n.startswith(f"base_model.model.{name}.") for n in trainable), name
    train_steps(model)
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if any(s in n for s in shared))
    merged_out = logits(model)
    torch.testing.assert_close(logits(model.merge_and_unload()), merged_out, atol=1e-5, rtol=0)


def test_non_expert_modules_variant():
    base = make_model("deepseek_v2")
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts={1: [0, 3]}, train_non_expert_modules=True))
    assert torch.equal(logits(model), reference)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, ModuleDeltaLayer)}
    assert any("self_attn.q_proj" in n for n in wrapped) and any("input_layernorm" in n for n in wrapped)
    assert any(n.endswith("model.norm") for n in wrapped)
    assert any("layers.0.mlp.gate_proj" in n for n in wrapped)  # the dense MLP of layer 0
    assert not any("embed_tokens" in n or "lm_head" in n or ".experts" in n or n.endswith("mlp.gate") or "shared" in n for n in wrapped)
    train_steps(model)
    out = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    torch.testing.assert_close(logits(model.merge_and_unload()), out, atol=1e-5, rtol=0)


def test_router_is_frozen_by_default_and_trainable_on_request():
    base = make_model("qwen3_moe")
    model = get_peft_model(base, ESFTConfig(experts={0: [1]}))
    assert not any("mlp.gate" in n for n in delta_params(model))
    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1]}, train_router=True))
    assert any("layers.0.mlp.gate.esft_delta" in n for n in delta_params(model))
    train_steps(model)
    assert delta_params(model)["base_model.model.model.layers.0.mlp.gate.esft_delta.default.weight"].abs().sum() > 0


@pytest.mark.parametrize("family", ["llama4_text", "phimoe", "qwen3_moe", "deepseek_v2", "mixtral"])
def test_router_training_on_routers_that_return_tuples(family):
    # llama4's and phimoe's routers subclass nn.Linear but return tuples: they must run their own forward.
    base = make_model(family)
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts=selection(base), train_router=True))
    assert torch.equal(logits(model), reference)
    routers = [n for n in delta_params(model) if ".gate." in n or ".router." in n]
    assert routers, list(delta_params(model))
    train_steps(model)
    assert any(delta_params(model)[n].abs().sum() > 0 for n in routers)
    out = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    torch.testing.assert_close(logits(model.merge_and_unload()), out, atol=1e-5, rtol=0)
