"""peft conventions ESFT follows: ``init_weights``, ``in_features``/``out_features``, safe-merge wording, and
peft's one-wrapper-per-module constraint."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from esft_peft import ESFTConfig, ExpertsDeltaLayer, ModuleDeltaLayer
from esft_peft.tuners.esft.layer import RANDOM_INIT_SCALE
from tiny_families import make_model

INPUT = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "modulelist"])
def test_init_weights_true_is_the_identity_false_changes_outputs(family, tmp_path):
    base = _logits(make_model(family))
    config = dict(experts={1: [0, 1, 2, 3, 4, 5]}, train_non_expert_modules=["lm_head"])
    identity = get_peft_model(make_model(family), ESFTConfig(**config))
    assert torch.equal(_logits(identity), base)
    assert all(not delta.any() for name, delta in identity.named_parameters() if "esft_delta" in name)

    torch.manual_seed(0)
    random = get_peft_model(make_model(family), ESFTConfig(**config, init_weights=False))
    changed = _logits(random)
    assert not torch.allclose(changed, base, atol=1e-4)
    # the deltas' spread follows the weights they update (std = RANDOM_INIT_SCALE x RMS)
    head = random.base_model.model.lm_head
    rms = head.base_layer.weight.pow(2).mean().sqrt()
    assert 0.8 < head.esft_delta["default"]["weight"].std() / (RANDOM_INIT_SCALE * rms) < 1.2

    random.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_weights"] is False
    reloaded = PeftModel.from_pretrained(make_model(family), tmp_path)
    assert reloaded.peft_config["default"].init_weights is False
    assert torch.equal(_logits(reloaded), changed)  # the saved deltas, not new random ones


def test_init_weights_must_be_a_bool():
    with pytest.raises(ValueError, match="`init_weights` must be True .* or False"):
        ESFTConfig(experts={1: [0]}, init_weights="gaussian")


def test_wrapped_layers_expose_in_and_out_features_like_peft_layers():
    model = get_peft_model(
        make_model("modulelist"),
        ESFTConfig(experts={1: [2]}, train_non_expert_modules=["lm_head", "embed_tokens", "norm"]),
    )
    layers = {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
              if isinstance(m, ModuleDeltaLayer)}
    assert (layers["model.layers.1.mlp.experts.2.gate_proj"].in_features,
            layers["model.layers.1.mlp.experts.2.gate_proj"].out_features) == (32, 16)
    assert (layers["model.layers.1.mlp.experts.2.down_proj"].in_features,
            layers["model.layers.1.mlp.experts.2.down_proj"].out_features) == (16, 32)
    assert (layers["lm_head"].in_features, layers["lm_head"].out_features) == (32, 96)
    assert (layers["model.embed_tokens"].in_features, layers["model.embed_tokens"].out_features) == (96, 32)
    assert (layers["model.norm"].in_features, layers["model.norm"].out_features) == (None, None)  # as peft: unknown
    fused = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={1: [2]}))
    experts = next(m for m in fused.modules() if isinstance(m, ExpertsDeltaLayer))
    assert (experts.in_features, experts.out_features) == (None, None)  # no single pair for a bank of experts


def test_safe_merge_refuses_non_finite_weights_in_peft_wording():
    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={1: [2]}), adapter_name="mine")
    delta = next(p for name, p in model.named_parameters() if "esft_delta" in name)
    with torch.no_grad():
        delta[0].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="^NaNs detected in the merged weights. The adapter mine seems to be broken$"):
        model.merge_adapter(safe_merge=True)


@pytest.mark.parametrize(("family", "option"), [
    ("gpt_oss", dict(train_non_expert_modules=True)),  # self_attn owns `sinks` and contains q_proj, ...
    ("jamba", dict(train_non_expert_modules=True)),  # the mamba mixer owns A_log/D and contains conv1d, ...
    ("ernie4_5_moe", dict(train_router=True)),  # the gate owns its weight and contains moe_statics
])
def test_a_module_and_a_module_inside_it_cannot_both_be_wrapped(family, option):
    # peft replaces a target module by its tuner layer, after which the modules inside it are no longer found
    model = make_model(family)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="ESFT cannot train both .* and .* inside it"):
        get_peft_model(model, ESFTConfig(experts={0: [0]}, **option))
    assert not any(hasattr(m, "esft_delta") for m in model.modules())  # refused before anything was touched
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
