import subprocess
import sys

import peft
from transformers import AutoModelForCausalLM
import pytest
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import esft_peft
from esft_peft import ESFTConfig, ESFTModel
from esft_peft.tuners import registration
from esft_peft import register_esft
from esft_peft.tuners.registration import RegistrationError
from esft_helpers import logits, selection, train_steps
from tiny_families import make_model


def test_peft_type_member_and_mappings():
    assert PeftType("ESFT") is PeftType.ESFT
    assert PeftType.ESFT in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ESFT] is ESFTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ESFT] is ESFTModel
    assert ESFTConfig(experts={1: [0]}).peft_type == PeftType.ESFT


def test_registration_is_idempotent():
    members = list(PeftType)
    assert register_esft() is PeftType.ESFT
    assert register_esft() is PeftType.ESFT
    assert list(PeftType) == members


def test_registration_fails_loudly_when_peft_changes(monkeypatch):
    class FakeEnum:  # not a str Enum: the layout esft-peft relies on is gone
        __members__ = {}

    monkeypatch.setattr(registration, "PeftType", FakeEnum)
    with pytest.raises(RegistrationError, match="esft-peft cannot register"):
        registration._extend_peft_type("ESFT_NEW")


def test_another_class_registered_for_esft_is_refused(monkeypatch):
    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.ESFT, peft.LoraConfig)
    with pytest.raises(RegistrationError, match="already registered"):
        register_esft()


def test_import_twice_in_fresh_process():
    code = "import esft_peft, importlib; importlib.reload(esft_peft); from peft import PeftType; print(PeftType('ESFT').value)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ESFT"


def test_peft_and_transformers_entry_points(tmp_path):
    base = make_model("qwen3_moe")
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    train_steps(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, ESFTConfig) and config.peft_type == PeftType.ESFT

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(auto, PeftModel)
    assert torch_equal(logits(auto), expected)

    plain = make_model("qwen3_moe")
    plain.load_adapter(str(tmp_path / "adapter"), adapter_name="task")
    assert torch_equal(logits(plain), expected)
    status = PeftModel(make_model("qwen3_moe"), ESFTConfig(experts=selection(base))).get_model_status()
    assert status.peft_types == {"default": "ESFT"}
    assert status.adapter_model_type == "ESFTModel"
    if transformers_manages_adapters():
        plain.delete_adapter("task")
        assert torch_equal(logits(plain), logits(make_model("qwen3_moe")))


def transformers_manages_adapters() -> bool:
    """transformers 5.24 gates add/set/delete_adapter behind peft >= 0.22, which is not released yet."""
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as hf_peft

    return Version(peft.__version__) >= Version(getattr(hf_peft, "MIN_PEFT_VERSION", "0"))


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)
