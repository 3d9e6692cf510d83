"""Wrapping a model whose weights DeepSpeed ZeRO-3 has partitioned (zero.Init): ESFT reads whole shapes from
DeepSpeed's records. Partitions are imitated here (``ds_id``/``ds_shape``, empty data), as ZeRO-3 leaves them
outside a gather; real ZeRO-3 training runs in test_distributed_training.py."""

import pytest
import torch
from peft import get_peft_model

from esft_peft import ESFTConfig
from esft_peft.interop.hub import adapter_statistics
from esft_peft.moe.partitioned import is_partitioned, logical_shape
from esft_helpers import selection
from tiny_families import make_model


def imitate_zero3_partitions(model: torch.nn.Module) -> None:
    for index, param in enumerate(model.parameters()):
        param.ds_id, param.ds_shape, param.ds_numel = index, param.shape, param.numel()
        param.data = torch.empty(0, dtype=param.dtype)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "modulelist", "llama4_text"])
def test_partitioned_model_wraps_like_a_whole_one(family):
    whole = make_model(family)
    expected = get_peft_model(whole, ESFTConfig(experts=selection(whole), train_shared_experts=family == "deepseek_v2"))
    partitioned = make_model(family)
    imitate_zero3_partitions(partitioned)
    assert all(is_partitioned(p) for p in partitioned.parameters())
    model = get_peft_model(partitioned, ESFTConfig(experts=selection(partitioned),
                                                   train_shared_experts=family == "deepseek_v2"))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if ".esft_delta." in n}
    assert shapes == {n: tuple(p.shape) for n, p in expected.named_parameters() if ".esft_delta." in n} and shapes
    assert model.peft_config["default"].base_layout == expected.peft_config["default"].base_layout
    assert adapter_statistics(model) == adapter_statistics(expected)
    assert not any(is_partitioned(p) for n, p in model.named_parameters() if ".esft_delta." in n)


def test_partitioned_dbrx_is_refused_with_the_fix():
    model = make_model("dbrx")
    imitate_zero3_partitions(model)
    with pytest.raises(ValueError, match="dbrx experts are partitioned by DeepSpeed ZeRO-3.*call get_peft_model before"):
        get_peft_model(model, ESFTConfig(experts=selection(model)))


def test_logical_shape_of_ordinary_tensors():
    tensor = torch.zeros(2, 3)
    assert logical_shape(tensor) == (2, 3) and not is_partitioned(tensor)
