"""PEFT behaviours of PESC adapters (with their LoRA part), checked against the dense model on every dense family."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from transformers import AutoModelForCausalLM

from esft_peft import PESCConfig, PESCLayer, find_moe_layers, score_experts
from esft_helpers import batch, logits, reload_in_fresh_process, safetensors_layout, state_copy, train_steps
from pesc_helpers import SETTINGS, adapter_params, crafted, pesc_layers, reference_layer
from test_registration import transformers_manages_adapters
from tiny_dense import DENSE_FAMILIES, make_dense_model

FAMILIES = list(DENSE_FAMILIES)
SAVED_KEY = re.compile(
    r"^base_model\.model\..+\.(pesc_router\.weight|pesc_down|pesc_up|pesc_lora_A\.weight|pesc_lora_B\.weight)$"
)
MERGE_ATOL = 1e-5  # fp32: LoRA folded into the dense weights changes the rounding of W x + B A x


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_is_bit_identical_and_only_adapters_train(family):
    model, reference = crafted(family)
    assert torch.equal(logits(model), reference)
    layers = pesc_layers(model)
    assert len(layers) == model.get_base_model().config.num_hidden_layers  # every decoder MLP, found structurally
    hidden, experts, dim = 32, SETTINGS["num_experts"], SETTINGS["adapter_dim"]
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(adapter_params(model))
    per_layer = experts * hidden + 2 * experts * dim * hidden  # router + D + U
    assert sum(v for n, v in trainable.items() if ".pesc_" in n and ".pesc_lora_" not in n) == len(layers) * per_layer
    assert any(".pesc_lora_A." in n for n in trainable)
    for layer in layers.values():
        assert layer.pesc_up["default"].abs().sum() == 0 and layer.pesc_down["default"].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_weights_are_shared_not_copied(family):
    base = make_dense_model(family)
    pointers = {n: p.data_ptr() for n, p in base.named_parameters()}
    model, _ = crafted(family)
    after = {n.replace(".base_layer", ""): p.data_ptr() for n, p in base.named_parameters() if n not in
             adapter_params(base)}
    assert after == pointers


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_matches_the_paper_formula(family):
    model, _ = crafted(family, lora=False, adapter_scaling=0.5)
    train_steps(model)  # non-zero U
    model.eval()
    x = torch.randn(2, 5, model.get_base_model().config.hidden_size)
    with torch.no_grad():
        for layer in pesc_layers(model).values():
            torch.testing.assert_close(layer(x), reference_layer(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_output_and_disable_is_exact(family):
    model, reference = crafted(family)
    train_steps(model)
    assert all(p.abs().sum() > 0 for n, p in adapter_params(model).items() if "pesc_up" in n)
    assert not torch.allclose(logits(model), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    assert not torch.allclose(logits(model), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_exact_with_documented_keys(family, tmp_path):
    model, _ = crafted(family)
    train_steps(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    header, _ = safetensors_layout(tmp_path / "adapter_model.safetensors")
    keys = set(header) - {"__metadata__"}
    assert keys and all(SAVED_KEY.match(k) for k in keys), sorted(keys)[:4]
    mlp = next(iter(pesc_layers(model)))
    assert header[f"{mlp}.pesc_down"]["shape"] == [4, 8, 32] and header[f"{mlp}.pesc_up"]["shape"] == [4, 32, 8]
    assert header[f"{mlp}.pesc_router.weight"]["shape"] == [4, 32]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PESC" and saved["base_model_type"] == family
    layer = saved["base_shapes"]["0"]
    assert layer["hidden_size"] == 32 and layer["intermediate_size"] == 48 and layer["module"].endswith("layers.0.mlp")
    loaded = PeftModel.from_pretrained(make_dense_model(family), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    resumed = PeftModel.from_pretrained(make_dense_model(family), tmp_path, is_trainable=True)
    before = {n: p.detach().clone() for n, p in adapter_params(resumed).items()}
    assert before and all(p.requires_grad for p in adapter_params(resumed).values())
    train_steps(resumed, seed=7)
    assert any(not torch.equal(p, before[n]) for n, p in adapter_params(resumed).items())


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_peft_model_and_transformers_load_adapter(family, tmp_path):
    make_dense_model(family).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model, _ = crafted(family)
    model.base_model.model.name_or_path = str(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    train_steps(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), PESCConfig)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(logits(auto), expected)
    base.load_adapter(str(tmp_path / "adapter"), adapter_name="task")
    assert torch.equal(logits(base), expected)
    ids = batch(3)
    with_labels = base(input_ids=ids, labels=ids).loss  # the load-balancing loss is added here too
    plain = torch.nn.functional.cross_entropy(base(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert with_labels > plain
    if transformers_manages_adapters():
        base.delete_adapter("task")
        assert torch.equal(logits(base), logits(make_dense_model(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_multiple_adapters_set_delete_load(family, tmp_path):
    model, reference = crafted(family)
    train_steps(model)
    first = logits(model)
    model.add_adapter("other", PESCConfig(num_experts=2, top_k=1, adapter_dim=4, adapter_dropout=0.0))
    model.set_adapter("other")
    assert torch.equal(logits(model), reference)  # a new adapter starts as the dense model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    train_steps(model, seed=3)
    second = logits(model)
    assert not torch.equal(second, first)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)
    model.save_pretrained(tmp_path)
    model.delete_adapter("other")
    assert "other" not in model.peft_config and not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), first)
    model.load_adapter(tmp_path / "other", adapter_name="again")
    model.set_adapter("again")
    assert torch.equal(logits(model), second)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_refused_merge_lora_keeps_pesc_and_unload(family, tmp_path):
    model, reference = crafted(family)
    train_steps(model)
    expected = logits(model)
    state = state_copy(model)
    with pytest.raises(ValueError, match="cannot be merged into the dense weights"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    current = model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in state.items())  # nothing was touched
    model.merge_lora()
    assert not any(".pesc_lora_A." in n or ".pesc_lora_B." in n for n, _ in model.named_parameters())
    assert len(pesc_layers(model)) == model.get_base_model().config.num_hidden_layers
    torch.testing.assert_close(logits(model), expected, atol=MERGE_ATOL, rtol=0)
    model.save_pretrained(tmp_path / "pesc-only")
    dense = model.unload()
    assert not pesc_layers(dense)
    dense.save_pretrained(tmp_path / "merged")
    merged_base = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not torch.allclose(logits(merged_base), reference)  # the LoRA part is in the dense weights now
    reloaded = PeftModel.from_pretrained(merged_base, tmp_path / "pesc-only")
    torch.testing.assert_close(logits(reloaded), expected, atol=MERGE_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_crafted_model_is_scored_as_an_moe(family):
    model, _ = crafted(family, lora=False)
    train_steps(model)
    layers = find_moe_layers(model)
    assert list(layers) == ["0", "1"] and {layer.kind for layer in layers.values()} == {"pesc"}
    data = [{"input_ids": batch(seed, (1, 12))[0].tolist()} for seed in range(5)]
    scores = score_experts(model, data, token_budget=None, show_progress=False)
    for key in ("0", "1"):
        assert sum(scores.token_scores[key]) == pytest.approx(1.0)
        assert sum(scores.gate_scores[key]) == pytest.approx(1.0)
        assert sum(scores.expert_counts[key]) == 5 * 12 * SETTINGS["top_k"]
    assert scores.top_k == SETTINGS["top_k"]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    model, _ = crafted(family, router_aux_loss_coef=0.1)
    train_steps(model)
    model.train()
    ids = batch(11, (2, 12))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapter_params(model).items()})
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "pesc_router" in n)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_fresh_process_reload_is_exact_on_every_family(tmp_path):
    folders = {}
    for family in FAMILIES:
        model, _ = crafted(family)
        train_steps(model)
        folder = tmp_path / family
        model.save_pretrained(folder)
        torch.save(logits(model), folder / "expected.pt")
        folders[family] = str(folder)
    runs = {family: (family, None, folder) for family, folder in folders.items()}
    assert reload_in_fresh_process("tiny_dense:make_dense_model", runs) == {family: True for family in FAMILIES}


def test_family_matrix_includes_fused_gate_up_and_gateless_mlps():
    mlps = {family: type(make_dense_model(family).model.layers[0].mlp).__name__ for family in FAMILIES}
    assert hasattr(make_dense_model("phi3").model.layers[0].mlp, "gate_up_proj")
    assert hasattr(make_dense_model("starcoder2").model.layers[0].mlp, "c_fc")
    assert {"llama", "qwen2", "qwen3", "mistral"} <= set(mlps) and len(mlps) >= 8
    assert len(PESCLayer.adapter_layer_names) == 3
