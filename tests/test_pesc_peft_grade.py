"""Issue 18 for PESC: mixed-adapter batches, a second adapter over a first one's LoRA part, peft's layer attributes,
the aux loss as a tuner method over recorded routing, and plans on the tuner (the config stays plain data)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import PeftModel, get_peft_model

from esft_peft import PESCConfig, router_aux_loss
from esft_helpers import batch, logits
from pesc_helpers import SETTINGS, pesc_layers
from tiny_dense import make_dense_model

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def two_adapters(family: str = "llama", **extra):
    config = PESCConfig(**{**SETTINGS, **LORA, "init_weights": False, **extra})
    torch.manual_seed(0)
    model = get_peft_model(make_dense_model(family), config, adapter_name="a")
    model.add_adapter("b", PESCConfig(**{**SETTINGS, **LORA, "init_weights": False, **extra}))
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_mixed_batch_gives_each_sample_its_own_adapter(family):
    model = two_adapters(family)
    ids = batch(5)[:4]
    names = ["__base__", "a", "b", "a"]
    with torch.no_grad():
        with model.disable_adapter():
            alone = {"__base__": model(input_ids=ids).logits}
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
        mixed = model(input_ids=ids, adapter_names=names).logits
    assert not torch.allclose(alone["a"], alone["b"]) and not torch.allclose(alone["a"], alone["__base__"])
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=0, atol=1e-6)
    generated = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, do_sample=False, num_beams=2)
    assert generated.shape[0] == 4


def test_mixed_batch_errors_are_clear():
    model = two_adapters()
    ids = batch(5)[:2]
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): c"):
        model(input_ids=ids, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(input_ids=ids, adapter_names=["a", "b", "a"])
    with pytest.raises(TypeError, match="expected a list of str"):
        model(input_ids=ids, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["a", "b"])


def test_pesc_layer_has_in_and_out_features():
    model = two_adapters()
    for layer in pesc_layers(model).values():
        assert layer.in_features == layer.out_features == 32


def test_plans_live_on_the_tuner_not_on_the_config():
    model = two_adapters()
    for config in model.peft_config.values():
        assert not any(key.startswith("_pesc") for key in vars(config))
        assert {f.name for f in dataclasses.fields(config)} >= set(vars(config)) - {"peft_type", "task_type"}
    assert set(model.base_model.plans) == {"a", "b"}
    model.delete_adapter("b")
    assert set(model.base_model.plans) == {"a"}


def first_with_lora_on_down_proj():
    config = PESCConfig(**SETTINGS, lora_r=4, lora_dropout=0.0, lora_target_modules=["down_proj"], init_weights=False)
    torch.manual_seed(0)
    return get_peft_model(make_dense_model("llama"), config).eval()


def test_second_adapter_over_a_lora_part_on_the_mlp(tmp_path):
    model = first_with_lora_on_down_proj()
    assert model.peft_config["default"].base_shapes["0"]["intermediate_size"] == 48
    fresh = PESCConfig(**SETTINGS, init_weights=False)
    model.add_adapter("fresh", fresh)
    assert model.peft_config["fresh"].base_shapes == model.peft_config["default"].base_shapes  # 48, not lora_r
    resolved = copy.deepcopy(model.peft_config["default"])
    model.add_adapter("resolved", resolved)
    model.set_adapter("fresh")
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_dense_model("llama"), tmp_path / "fresh").eval()  # a fresh base
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)
    model.load_adapter(tmp_path / "fresh", adapter_name="again")
    model.set_adapter("again")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)
    on_top = PeftModel.from_pretrained(first_with_lora_on_down_proj().base_model.model, tmp_path / "fresh",
                                       adapter_name="top")
    assert "top" in on_top.peft_config


def test_aux_loss_is_a_tuner_method_over_recorded_routing():
    model = two_adapters(router_aux_loss_coef=0.1)
    model.base_model.set_adapter(["a", "b"])
    ids = batch(2)
    model(input_ids=ids)
    tuner = model.base_model
    both = tuner._get_router_aux_loss()
    only_a = tuner._get_router_aux_loss(adapter_names="a")
    only_b = tuner._get_router_aux_loss(adapter_names=["b"])
    assert both is not None and torch.allclose(both, only_a + only_b)
    assert torch.equal(router_aux_loss(model), both)
    for layer in pesc_layers(model).values():  # nothing about the last forward is kept on the layers
        assert not any(isinstance(v, (tuple, dict)) and "routing" in k for k, v in vars(layer).items())
    labelled = model(input_ids=ids, labels=ids).loss
    model.base_model.peft_config["a"].router_aux_loss_coef = 0.0
    model.base_model.peft_config["b"].router_aux_loss_coef = 0.0
    plain = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(labelled - plain, both, rtol=1e-5, atol=1e-6)
