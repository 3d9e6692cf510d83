"""Mixed-adapter batches (peft's ``adapter_names=``): each sample runs with its own adapter, on every layout."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from esft_peft import ESFTConfig, find_moe_layers
from esft_helpers import assert_generates_as_alone
from tiny_families import make_model

# One family per experts layout: fused, module_list, parallel_linear (the block is the wrapped module),
# split_glu, dense_bmm (the block returns one row per token).
LAYOUT_FAMILIES = ["qwen3_moe", "modulelist", "jetmoe", "dbrx", "llama4_text"]
NAMES = ["a", "__base__", "b", "a", "b", "__base__"]


def _two_adapters(family: str, **extra):
    model = make_model(family)
    layers = list(find_moe_layers(model))
    torch.manual_seed(1)
    config_a = ESFTConfig(experts={layers[0]: [0, 2], layers[-1]: [1, 3]}, init_weights=False, **extra)
    config_b = ESFTConfig(experts={layers[-1]: [0, 1, 2]}, init_weights=False, train_router=True,
                          train_non_expert_modules=["lm_head"])
    peft_model = get_peft_model(model, config_a, adapter_name="a")
    peft_model.add_adapter("b", config_b)
    return peft_model.eval()


def _inputs(batch: int = len(NAMES), length: int = 7) -> torch.Tensor:
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(5))


def _logits(model, input_ids: torch.Tensor, adapter: str) -> torch.Tensor:
    with torch.no_grad():
        if adapter == "__base__":
            with model.disable_adapter():
                return model(input_ids=input_ids).logits
        model.set_adapter(adapter)
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("family", LAYOUT_FAMILIES)
def test_each_sample_uses_its_adapter_exactly(family):
    model = _two_adapters(family, train_non_expert_modules=["self_attn.o_proj"] if family == "qwen3_moe" else False)
    input_ids = _inputs()
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=NAMES).logits
    assert model.active_adapters == ["a"]  # a mixed batch leaves the active adapter alone
    alone = torch.cat([_logits(model, input_ids[i : i + 1], name) for i, name in enumerate(NAMES)])
    batched = {name: _logits(model, input_ids, name) for name in set(NAMES)}
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i], alone[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed[i], batched[name][i], rtol=0, atol=1e-6)
    # the adapters really differ on these samples, so the check above can fail
    assert not torch.allclose(batched["a"], batched["b"], atol=1e-4)
    assert not torch.allclose(batched["a"], batched["__base__"], atol=1e-4)


def test_modules_to_save_follow_the_sample_adapter():
    model = make_model("qwen3_moe")
    torch.manual_seed(1)
    model = get_peft_model(model, ESFTConfig(experts={1: [0, 2]}, modules_to_save=["lm_head"]), adapter_name="a")
    model.add_adapter("b", ESFTConfig(experts={1: [3]}, modules_to_save=["lm_head"]))
    for name, scale in (("a", 2.0), ("b", -1.0)):
        model.base_model.model.lm_head.modules_to_save[name].weight.data.mul_(scale)
    model.eval()
    input_ids = _inputs()
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=NAMES).logits
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i], _logits(model, input_ids[i : i + 1], name)[0], rtol=0, atol=1e-6)


def test_generate_with_mixed_adapters_matches_single_adapter_generation():
    model = _two_adapters("qwen3_moe")
    input_ids = _inputs(batch=3, length=4)
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=names, max_new_tokens=5, do_sample=False)
        assert_generates_as_alone(model, input_ids, names, mixed)


def test_bad_adapter_names_are_refused_before_running():
    model = _two_adapters("qwen3_moe")
    input_ids = _inputs()
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): typo"):
        model(input_ids=input_ids, adapter_names=["a", "typo", "b", "a", "b", "a"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(input_ids=input_ids, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="expected a list of str"):
        model(input_ids=input_ids, adapter_names="a")
    with pytest.raises(ValueError, match="together with output_router_logits=True"):
        model(input_ids=input_ids, adapter_names=NAMES, output_router_logits=True)
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(input_ids=input_ids, adapter_names=NAMES)
    model.eval()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        model(input_ids=input_ids, adapter_names=NAMES)
    model.unmerge_adapter()
    # nothing stayed patched: a plain forward is the active adapter's
    with torch.no_grad():
        plain = model(input_ids=input_ids).logits
    torch.testing.assert_close(plain, _logits(model, input_ids, "a"), rtol=0, atol=0)
    assert all(getattr(m, "_forced_adapters", None) is None for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())
