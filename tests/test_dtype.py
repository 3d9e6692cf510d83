"""bf16 and fp32 bases: fp32 master deltas by default, exact zero adapters, reported merge rounding."""

import logging

import torch
from peft import get_peft_model

from esft_peft import ESFTConfig, find_moe_layers
from esft_helpers import delta_params, logits, train_steps
from tiny_families import make_model


def test_bf16_base_keeps_fp32_deltas_and_is_exact_at_zero():
    base = make_model("qwen3_moe", dtype=torch.bfloat16)
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts={0: [0, 5]}))
    assert {p.dtype for p in delta_params(model).values()} == {torch.float32}
    assert torch.equal(logits(model), reference)
    train_steps(model, lr=1e-2)
    assert logits(model).dtype == torch.bfloat16
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)


def test_bf16_deltas_on_request():
    model = get_peft_model(make_model("qwen3_moe", dtype=torch.bfloat16), ESFTConfig(experts={0: [0]}),
                           autocast_adapter_dtype=False)
    assert {p.dtype for p in delta_params(model).values()} == {torch.bfloat16}


def test_small_update_lost_when_merging_into_bf16_is_reported(caplog):
    model = get_peft_model(make_model("qwen3_moe", dtype=torch.bfloat16), ESFTConfig(experts={0: [2]}))
    experts = model.get_base_model().model.layers[0].mlp.experts
    original = experts.base_layer.gate_up_proj[2].detach().clone()
    with torch.no_grad():
        for delta in delta_params(model).values():
            delta.fill_(1e-5)  # far below bf16 resolution of weights around 1e-2
    assert {p.dtype for p in delta_params(model).values()} == {torch.float32}  # the fp32 master keeps it
    with caplog.at_level(logging.WARNING, logger="esft_peft.tuners.esft.layer"):
        model.merge_adapter()
    assert "rounded away" in caplog.text
    model.unmerge_adapter()
    assert torch.equal(experts.base_layer.gate_up_proj[2], original)


def test_large_enough_update_survives_bf16_merge(caplog):
    model = get_peft_model(make_model("qwen3_moe", dtype=torch.bfloat16), ESFTConfig(experts={0: [2]}))
    with torch.no_grad():
        for delta in delta_params(model).values():
            delta.copy_(torch.randn_like(delta) * 0.05)
    with caplog.at_level(logging.WARNING, logger="esft_peft.tuners.esft.layer"):
        merged = model.merge_and_unload()
    assert "rounded away" not in caplog.text
    assert merged.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_bf16_merged_model_reproduces_the_adapter_forward_exactly():
    # The dtype policy: W + delta summed in fp32 and rounded once to bf16, in the forward and in the merge alike.
    for family in ("qwen3_moe", "deepseek_v2", "gpt_oss"):
        base = make_model(family, dtype=torch.bfloat16)
        model = get_peft_model(base, ESFTConfig(experts={list(find_moe_layers(base))[0]: [0, 3]}))
        train_steps(model, lr=1e-2)
        with torch.no_grad():
            for delta in delta_params(model).values():  # sub-bf16 parts that the rounding must treat alike
                delta.add_(torch.randn_like(delta) * 1e-4)
        adapted = logits(model)
        merged = model.merge_and_unload()
        assert merged.model.layers[-1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
        assert torch.equal(logits(merged), adapted), family
