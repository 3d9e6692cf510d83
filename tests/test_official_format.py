"""Official ESFT adapter format <-> esft-peft deltas, on synthetic official files built from tiny models."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from esft_peft import find_moe_layers
from esft_peft.defaults import EXPERT_CONFIG_NAME
from esft_peft.moe.errors import UnsupportedLayoutError
from esft_peft.interop.official import (
    convert_from_official,
    convert_to_official,
    load_official_adapter,
    official_key,
    save_official_adapter,
)
from esft_helpers import logits, train_steps
from tiny_families import make_model


def _base_expert(model, layer_key: str, expert: int) -> dict[str, torch.Tensor]:
    """Unfused gate/up/down weights of one expert, read independently of the converter."""
    experts = model.get_submodule(find_moe_layers(model)[layer_key].experts_name)
    inter = experts.down_proj.shape[-1]
    gate_up = experts.gate_up_proj[expert]
    return {"gate_proj": gate_up[:inter], "up_proj": gate_up[inter:], "down_proj": experts.down_proj[expert]}


def _write_official(tmp_path, family: str, selection: dict[str, list[int]], prefix: str = "model."):
    """A synthetic official adapter: fine-tuned-like full replacement weights of the selected experts."""
    base = make_model(family)
    generator = torch.Generator().manual_seed(1)
    state, expected = {}, {}
    for layer, ids in selection.items():
        for expert in ids:
            for projection, weight in _base_expert(base, layer, expert).items():
                scale = 1 + 0.2 * (torch.rand(weight.shape, generator=generator) - 0.5)
                new = (weight * scale).contiguous()
                state[official_key(layer, expert, projection).replace("model.", prefix, 1)] = new
                expected[(layer, expert, projection)] = new
    directory = tmp_path / "official"
    directory.mkdir()
    save_file(state, str(directory / "adapter.safetensors"))
    (directory / EXPERT_CONFIG_NAME).write_text(
        json.dumps({"experts": selection, "shared_experts": False, "non_expert_modules": False})
    )
    return directory, expected


def _reference_model(family: str, expected) -> torch.nn.Module:
    """The base with the selected experts overwritten, as the authors' code does."""
    model = make_model(family)
    with torch.no_grad():
        for (layer, expert, projection), weight in expected.items():
            _base_expert(model, layer, expert)[projection].copy_(weight)
    return model


@pytest.mark.parametrize("family,prefix", [("deepseek_v2", "model."), ("qwen3_moe", "")])
def test_import_matches_overwritten_experts_and_round_trips_exactly(tmp_path, family, prefix):
    layers = list(find_moe_layers(make_model(family)))
    selection = {layers[0]: [5, 0, 2], layers[-1]: [7]}
    official_dir, expected = _write_official(tmp_path, family, selection, prefix)

    peft_model = load_official_adapter(make_model(family), official_dir)
    assert peft_model.peft_config["default"].experts == selection
    torch.testing.assert_close(logits(peft_model), logits(_reference_model(family, expected)), rtol=1e-5, atol=1e-5)

    out = save_official_adapter(peft_model, tmp_path / "back")
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == {official_key(l, e, p) for (l, e, p) in expected}
    for (layer, expert, projection), weight in expected.items():
        assert torch.equal(exported[official_key(layer, expert, projection)], weight)
    assert json.loads((out / EXPERT_CONFIG_NAME).read_text())["experts"] == selection


def test_directory_conversions_both_ways(tmp_path):
    selection = {"1": [3, 1]}
    official_dir, expected = _write_official(tmp_path, "deepseek_v2", selection)
    adapter_dir = convert_from_official(official_dir, make_model("deepseek_v2"), tmp_path / "adapter")
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(make_model("deepseek_v2"), str(adapter_dir))
    torch.testing.assert_close(logits(loaded), logits(_reference_model("deepseek_v2", expected)), rtol=1e-5, atol=1e-5)

    back = convert_to_official(adapter_dir, make_model("deepseek_v2"), tmp_path / "official_again")
    exported = load_file(str(back / "model.safetensors"))
    for (layer, expert, projection), weight in expected.items():
        assert torch.equal(exported[official_key(layer, expert, projection)], weight)


def test_trained_esft_adapter_exports_the_weights_it_computes_with(tmp_path):
    from peft import get_peft_model

    from esft_peft import ESFTConfig

    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={"0": [1, 6], "1": [2]}))
    train_steps(model, steps=2, lr=1e-2)
    save_official_adapter(model, tmp_path / "official")
    reimported = load_official_adapter(make_model("qwen3_moe"), tmp_path / "official")
    torch.testing.assert_close(logits(reimported), logits(model), rtol=1e-5, atol=1e-5)


def test_modulelist_experts_are_supported(tmp_path):
    from peft import get_peft_model

    from esft_peft import ESFTConfig

    layer = next(iter(find_moe_layers(make_model("modulelist"))))
    model = get_peft_model(make_model("modulelist"), ESFTConfig(experts={layer: [0, 2]}))
    train_steps(model, steps=1, lr=1e-2)
    out = save_official_adapter(model, tmp_path / "official")
    keys = set(load_file(str(out / "model.safetensors")))
    assert official_key(layer, 2, "down_proj") in keys and len(keys) == 6
    reimported = load_official_adapter(make_model("modulelist"), out)
    torch.testing.assert_close(logits(reimported), logits(model), rtol=1e-5, atol=1e-5)


def test_unsupported_layout_and_mismatches_fail_clearly(tmp_path):
    official_dir, _ = _write_official(tmp_path, "deepseek_v2", {"1": [0]})
    with pytest.raises(UnsupportedLayoutError, match="is_concatenated=False"):
        load_official_adapter(make_model("gpt_oss"), official_dir)  # interleaved gate/up with biases
    with pytest.raises(ValueError, match="shape"):
        load_official_adapter(make_model("deepseek_v2", moe_intermediate_size=8), official_dir)
    (official_dir / EXPERT_CONFIG_NAME).write_text(json.dumps({"experts": {"1": [0, 4]}}))
    with pytest.raises(ValueError, match="missing"):
        load_official_adapter(make_model("deepseek_v2"), official_dir)
    with pytest.raises(FileNotFoundError, match="expert_cfg.json"):
        load_official_adapter(make_model("deepseek_v2"), tmp_path)
