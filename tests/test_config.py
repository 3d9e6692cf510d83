import json
from pathlib import Path

import pytest
from peft import get_peft_model

from esft_peft import ESFTConfig
from tiny_families import make_model

OFFICIAL = Path(__file__).parent / "data" / "esft_official"
TASKS = ["intent", "law", "summary", "translation"]


def test_keys_are_normalised_and_order_is_kept():
    config = ESFTConfig(experts={2: [5, 1], "1": [3], "encoder.0": [0]})
    assert config.experts == {"encoder.0": [0], "1": [3], "2": [5, 1]}
    assert config.num_selected_experts == 4


def test_config_json_round_trip(tmp_path):
    config = ESFTConfig(experts={1: [8, 26]}, train_shared_experts=True, train_non_expert_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    loaded = ESFTConfig.from_pretrained(tmp_path)
    assert loaded.experts == {"1": [8, 26]} and loaded.train_shared_experts
    assert loaded.train_non_expert_modules == ["q_proj"]


@pytest.mark.parametrize("task", TASKS)
def test_official_expert_configs_load_and_round_trip(task, tmp_path):
    data = json.loads((OFFICIAL / f"expert_config_{task}.json").read_text())
    config = ESFTConfig.from_expert_config(OFFICIAL / f"expert_config_{task}.json")
    assert config.to_expert_config() == {
        "experts": {k: data["experts"][k] for k in config.experts},
        "shared_experts": data["shared_experts"],
        "non_expert_modules": data["non_expert_modules"],
    }
    assert set(config.experts) == set(data["experts"]) and len(config.experts) == 26
    config.save_expert_config(tmp_path / "cfg.json")
    assert ESFTConfig.from_expert_config(tmp_path / "cfg.json").experts == config.experts


def test_official_counts():
    counts = {t: ESFTConfig.from_expert_config(OFFICIAL / f"expert_config_{t}.json").num_selected_experts for t in TASKS}
    assert counts == {"intent": 124, "law": 153, "summary": 128, "translation": 83}


@pytest.mark.parametrize(
    "experts, message",
    [
        ({1: []}, r"Layer 1: empty expert selection"),
        ({1: [3, 3, 4]}, r"Layer 1: duplicate expert ids \[3\]"),
        ({1: [-1, 2]}, r"Layer 1: invalid expert ids \[-1\]"),
        ({1: [1.5]}, r"Layer 1: invalid expert ids \[1.5\]"),
        ({"first": [1]}, r"not a layer index"),
        ({1: "0,1"}, r"Layer 1: expert ids must be a list"),
        ({}, r"at least one layer"),
    ],
)
def test_construction_validation(experts, message):
    with pytest.raises(ValueError, match=message):
        ESFTConfig(experts=experts)


def test_bad_official_file(tmp_path):
    (tmp_path / "x.json").write_text('{"layers": {}}')
    with pytest.raises(ValueError, match="x.json is not an ESFT expert config"):
        ESFTConfig.from_expert_config(tmp_path / "x.json")


def test_target_modules_is_refused():
    with pytest.raises(ValueError, match="does not use `target_modules`"):
        ESFTConfig(experts={1: [0]}, target_modules=["q_proj"])


def test_injection_validation_names_layer_ids_and_range():
    model = make_model("deepseek_v2")  # layer 0 is dense, layers 1-2 are MoE with 8 experts
    with pytest.raises(ValueError, match=r"Layer 0 is not an MoE layer .*\[1\].*MoE layers: 1, 2"):
        get_peft_model(model, ESFTConfig(experts={0: [1]}))
    with pytest.raises(ValueError, match=r"Layer 2: expert ids \[8, 9\] are out of range; valid ids are 0..7"):
        get_peft_model(model, ESFTConfig(experts={1: [0], 2: [8, 9, 1]}))
    with pytest.raises(ValueError, match=r"Layer 7 is not an MoE layer"):
        get_peft_model(model, ESFTConfig(experts={7: [0]}))
