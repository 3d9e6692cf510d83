"""Exactness per experts implementation, on every fused family: zero adapter, disable, merge, unmerge, unload, reload.

The adapter model computes fused experts through the module itself, so through the experts implementation the user
set (transformers' experts interface), in two calls with one slot per row (frozen pairs, selected pairs), summed
over the slots as the implementations sum them. Under grouped_mm (transformers' default) and batched_mm each pair is
computed as in the base call, so a zero adapter and a merged model reproduce the base bit for bit, with one
exception on CPU: gpt-oss's gate runs ``sigmoid`` on a contiguous intermediate, which CPU kernels vectorize but
compute with scalar code for the tensor's last few elements; a pair computed in a smaller call can fall into that
tail (or out of it), measured 1.5e-8 alone and 8.9e-8 in a parallel run on these logits (trained adapter, merged),
asserted below 1e-6. Under eager the base adds the slots in expert order
(``index_add_``), so the adapter model matches it to float rounding: measured at most 1.5e-7, asserted below 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from esft_peft import ESFTConfig, find_moe_layers
from esft_helpers import CPU_TAIL_ATOL, logits, reload_in_fresh_process, selection, state_copy, train_steps
from tiny_families import FAMILIES, make_model

IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")
EXACT = ("grouped_mm", "batched_mm")
ROUNDING = 1e-6  # fp32 logits, eager's expert-order sums against the slot-order sums
FUSED = [f for f in FAMILIES if {layer.kind for layer in find_moe_layers(make_model(f)).values()} == {"fused"}]


def model_with(family: str, implementation: str):
    model = make_model(family)
    model.set_experts_implementation(implementation)
    return model


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, implementation: str, family: str) -> None:
    if implementation in EXACT and family not in CPU_TAIL_ATOL:
        assert torch.equal(actual, expected)
    else:
        atol = CPU_TAIL_ATOL[family] if implementation in EXACT else ROUNDING
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FUSED)
def test_exactness_per_implementation(family, implementation):
    base = model_with(family, implementation)
    reference, pristine = logits(base), state_copy(base)
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    assert_matches(logits(model), reference, implementation, family)  # zero adapter
    train_steps(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, reference)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    model.merge_adapter()
    assert_matches(logits(model), adapted, implementation, family)  # the merged weights are the adapter's W + delta
    model.unmerge_adapter()
    restored = {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()}
    assert all(torch.equal(restored[k], v) for k, v in pristine.items())
    assert torch.equal(logits(model), adapted)
    unloaded = model.unload()
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in pristine.items())
    assert torch.equal(logits(unloaded), reference)


def test_fresh_process_reload_is_exact_per_implementation(tmp_path):
    runs = {}
    for family in FUSED[:4] + ["gpt_oss"]:
        for implementation in IMPLEMENTATIONS:
            name = f"{family}-{implementation}"
            model = get_peft_model(model_with(family, implementation), ESFTConfig(experts=selection(make_model(family))))
            train_steps(model)
            model.save_pretrained(tmp_path / name)
            torch.save(logits(model), tmp_path / name / "expected.pt")
            runs[name] = (family, implementation, str(tmp_path / name))
    assert reload_in_fresh_process("tiny_families:make_model", runs) == {name: True for name in runs}


def test_reloaded_adapter_in_this_process_is_exact_under_every_implementation(tmp_path):
    model = get_peft_model(make_model("deepseek_v2"), ESFTConfig(experts=selection(make_model("deepseek_v2"))))
    train_steps(model)
    model.save_pretrained(tmp_path)
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model.get_base_model().set_experts_implementation(implementation)
        outputs[implementation] = logits(model)
        loaded = PeftModel.from_pretrained(model_with("deepseek_v2", implementation), tmp_path)
        assert torch.equal(logits(loaded), outputs[implementation]), implementation
    # Each implementation computes (the adapter model used to ignore the setting and give one output for all).
    torch.testing.assert_close(outputs["eager"], outputs["grouped_mm"], atol=ROUNDING, rtol=0)
