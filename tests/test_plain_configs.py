"""Configs are plain data (plans live on the tuner; the scored expert count is a documented field) and saved tensors
are checked in peft's load hook, where peft holds them, not by ESFTConfig/PESCConfig.from_pretrained."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import fields

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from esft_peft import ESFTConfig, PESCConfig
from esft_peft.files import CorruptAdapterError
from esft_peft.scoring.scores import ExpertSelection
from esft_helpers import logits
from pesc_helpers import crafted
from tiny_dense import make_dense_model
from tiny_families import make_model

WEIGHTS = "adapter_model.safetensors"


def _no_hidden_state(config) -> None:
    declared = {f.name for f in fields(config)}
    assert set(vars(config)) <= declared, set(vars(config)) - declared


def _saved(tmp_path, family="qwen3_moe", experts=None):
    model = get_peft_model(make_model(family), ESFTConfig(experts=experts or {0: [1, 2]}, init_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def _poison(adapter, value=float("nan")):
    state = load_file(str(adapter / WEIGHTS))
    key = sorted(state)[0]
    state[key].view(-1)[:3] = value
    save_file(state, str(adapter / WEIGHTS), metadata={"format": "pt"})
    return key


def test_configs_hold_only_their_declared_fields_and_plans_live_on_the_tuner():
    base = make_model("qwen3_moe")
    model = get_peft_model(base, ESFTConfig(experts={0: [1, 2]}))
    model.add_adapter("second", ESFTConfig(experts={1: [3]}))
    for config in model.peft_config.values():
        _no_hidden_state(config)
        assert ESFTConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"}) == config
        pickle.loads(pickle.dumps(config))
    plans = model.base_model.plans
    assert set(plans) == {"default", "second"}
    assert all(".layers.0." in name for name in plans["default"]) and all(".layers.1." in name for name in plans["second"])
    model.delete_adapter("second")
    assert set(model.base_model.plans) == {"default"}
    crafted_model, _ = crafted("llama")
    for config in crafted_model.peft_config.values():
        assert isinstance(config, PESCConfig)
        copy.deepcopy(config)


def test_scored_expert_counts_are_a_documented_field(tmp_path):
    selection = ExpertSelection({"0": [1], "1": [2, 3]}, {"0": 8, "1": 8})
    config = ESFTConfig(experts=selection)
    assert config.scored_num_experts == {"0": 8, "1": 8}
    _no_hidden_state(config)
    assert config.to_expert_config()["num_experts"] == {"0": 8, "1": 8}
    config.save_expert_config(tmp_path / "cfg.json")
    assert ESFTConfig.from_expert_config(tmp_path / "cfg.json").scored_num_experts == {"0": 8, "1": 8}
    model = get_peft_model(make_model("qwen3_moe"), config)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["scored_num_experts"] == {"0": 8, "1": 8}
    assert ESFTConfig(experts={0: [1]}).scored_num_experts is None
    with pytest.raises(ValueError, match="must map layer -> expert count"):
        ESFTConfig(experts={0: [1]}, scored_num_experts={"0": 0})


def test_from_pretrained_reads_no_tensor_and_the_load_hook_refuses_nan(tmp_path):
    adapter = _saved(tmp_path)
    key = _poison(adapter)
    config = ESFTConfig.from_pretrained(adapter)  # the header is sound: nothing to refuse without reading tensors
    _no_hidden_state(config)
    base = make_model("qwen3_moe")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CorruptAdapterError, match=f"3 NaN/inf value\\(s\\) in 1 tensor\\(s\\) \\(e.g. 3 in {key}\\)"):
        PeftModel.from_pretrained(base, adapter)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_the_check_runs_in_peft_set_peft_model_state_dict(tmp_path):
    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1, 2]}))
    state = {k: v.clone() for k, v in load_file(str(_saved(tmp_path) / WEIGHTS)).items()}
    state[sorted(state)[0]][0] = float("inf")
    with pytest.raises(CorruptAdapterError, match="NaN/inf"):
        set_peft_model_state_dict(model, state, adapter_name="default")
    assert list(model.peft_config) == ["default"]  # an adapter the user created is never removed
    state.pop(sorted(state)[0])
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        set_peft_model_state_dict(model, state, adapter_name="default")


def test_a_failed_load_adapter_leaves_the_model_as_it_was(tmp_path):
    adapter = _saved(tmp_path / "bad")
    _poison(adapter, float("inf"))
    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1, 2]}, init_weights=False))
    expected = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptAdapterError, match="NaN/inf"):
        model.load_adapter(adapter, adapter_name="other")
    assert list(model.peft_config) == ["default"] and set(model.base_model.plans) == {"default"}
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    good = _saved(tmp_path / "good")
    model.load_adapter(good, adapter_name="other")
    assert set(model.peft_config) == {"default", "other"}


def test_pesc_tensors_are_checked_in_the_load_hook(tmp_path):
    model, _ = crafted("llama")
    model.save_pretrained(tmp_path)
    _poison(tmp_path)
    PESCConfig.from_pretrained(tmp_path)  # reads the header only
    with pytest.raises(CorruptAdapterError, match="NaN/inf"):
        PeftModel.from_pretrained(make_dense_model("llama"), tmp_path)


def test_modules_to_save_tensors_pass_the_load_checks(tmp_path):
    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1]}, modules_to_save=["lm_head"],
                                                               init_weights=False))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("qwen3_moe"), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
