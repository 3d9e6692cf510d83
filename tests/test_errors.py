import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from esft_peft import ESFTConfig, ESFTLayer, NotAnMoEModelError
from esft_peft.files import CorruptAdapterError
from esft_helpers import selection, state_copy, train_steps
from tiny_families import make_model


def saved_adapter(tmp_path, family="qwen3_moe", **overrides):
    base = make_model(family, **overrides)
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    train_steps(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_non_moe_model_says_what_was_searched():
    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(NotAnMoEModelError, match=r"LlamaForCausalLM has no mixture-of-experts layer.*Searched"):
        get_peft_model(AutoModelForCausalLM.from_config(config), ESFTConfig(experts={0: [0]}))


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("qwen3_moe", {"num_experts": 16}, r"adapter expects 8 experts .* base model has 16 experts"),
        ("qwen3_moe", {"moe_intermediate_size": 24}, r"per-expert shapes .* another base model"),
        ("olmoe", {}, r"created for a 'qwen3_moe' model, but the base model is 'olmoe'"),
    ],
)
def test_adapter_for_another_base_fails_before_touching_weights(tmp_path, family, overrides, message):
    adapter = saved_adapter(tmp_path)
    other = make_model(family, **overrides)
    before = state_copy(other)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(other, adapter)
    assert not any(isinstance(m, ESFTLayer) for m in other.modules())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


def test_truncated_adapter_file(tmp_path):
    adapter = saved_adapter(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptAdapterError, match="corrupt or truncated"):
        PeftModel.from_pretrained(make_model("qwen3_moe"), adapter)


def test_garbage_adapter_file(tmp_path):
    adapter = saved_adapter(tmp_path)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptAdapterError, match="unreadable safetensors header"):
        PeftModel.from_pretrained(make_model("qwen3_moe"), adapter)


def test_pickle_adapters_are_never_loaded(tmp_path, monkeypatch):
    adapter = saved_adapter(tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CorruptAdapterError, match="safetensors only"):
        PeftModel.from_pretrained(make_model("qwen3_moe"), adapter)


def test_shared_experts_requested_where_there_are_none():
    with pytest.raises(ValueError, match="MoE layer 0 has no shared experts"):
        get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1]}, train_shared_experts=True))


def test_non_expert_names_that_match_nothing():
    with pytest.raises(ValueError, match=r"matched no non-expert module"):
        get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1]}, train_non_expert_modules=["nope"]))
