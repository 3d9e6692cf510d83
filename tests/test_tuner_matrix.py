"""PEFT behaviours of ESFT adapters, checked against the base model on every family of the matrix."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from esft_peft import ESFTConfig, ESFTLayer, find_moe_layers
from esft_peft.tuners.esft.targets import base_layout
from esft_helpers import (
    assert_reproduces_base, delta_params, logits, reload_in_fresh_process, safetensors_layout, selection, state_copy, train_steps,
)
from tiny_families import FAMILIES, make_model

FAMILY_NAMES = list(FAMILIES)
MERGE_ATOL = 1e-5  # fp32: merged weights give the same logits up to float rounding of W + delta


def adapted(family: str, trained: bool = True, **config_kwargs):
    base = make_model(family)
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts=selection(base), **config_kwargs))
    if trained:
        train_steps(model)
    return model, reference


def expected_delta_numel(model) -> int:
    base = model.get_base_model()
    layers = find_moe_layers(base)
    config = model.peft_config["default"]
    layout = base_layout(base, layers, list(config.experts))
    total = 0
    for key, ids in config.experts.items():
        per_expert = sum(torch.Size(shape).numel() for shape in layout[key]["expert_shapes"].values())
        total += len(ids) * per_expert
    return total


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_only_selected_deltas_are_trainable(family):
    model, _ = adapted(family, trained=False)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".esft_delta.default." in n for n in trainable)
    assert sum(trainable.values()) == expected_delta_numel(model)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    count = int(re.search(r"trainable params: ([\d,]+)", printed.getvalue()).group(1).replace(",", ""))
    assert count == expected_delta_numel(model)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_zero_adapter_is_bit_identical_and_disable_is_exact(family):
    model, reference = adapted(family, trained=False)
    assert_reproduces_base(family, logits(model), reference)
    train_steps(model)
    assert any(p.abs().sum() > 0 for p in delta_params(model).values())
    assert not torch.allclose(logits(model), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    assert not torch.allclose(logits(model), reference)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_writes_only_selected_deltas(family, tmp_path):
    model, _ = adapted(family)
    model.save_pretrained(tmp_path)
    header, data_bytes = safetensors_layout(tmp_path / "adapter_model.safetensors")
    keys = {k for k in header if k != "__metadata__"}
    expected = {n.replace(".esft_delta.default.", ".esft_delta.") for n in delta_params(model)}
    assert keys == expected
    element = next(iter(delta_params(model).values())).element_size()
    assert data_bytes == expected_delta_numel(model) * element
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ESFT" and saved["experts"] == model.peft_config["default"].experts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_reload_exact_and_continue_training(family, tmp_path):
    model, _ = adapted(family)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(family), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    lazily = PeftModel.from_pretrained(make_model(family), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(logits(lazily), expected)
    resumed = PeftModel.from_pretrained(make_model(family), tmp_path, is_trainable=True)
    before = {n: p.detach().clone() for n, p in delta_params(resumed).items()}
    assert before and all(p.requires_grad for p in delta_params(resumed).values())
    train_steps(resumed, seed=7)
    assert any(not torch.equal(p, before[n]) for n, p in delta_params(resumed).items())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merge_unmerge_round_trip(family):
    model, _ = adapted(family)
    adapter_out = logits(model)
    base_state = state_copy(model.get_base_model())
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapter_out, atol=MERGE_ATOL, rtol=0)
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_state.items())
    assert torch.equal(logits(model), adapter_out)


def _unselected_experts_equal(family: str, merged, base, experts: dict[str, list[int]]) -> None:
    layers = find_moe_layers(base)
    merged_params = dict(merged.named_parameters())
    for key, layer in layers.items():
        chosen = set(experts.get(key, []))
        if layer.expert_modules:
            for expert, name in layer.expert_modules.items():
                for pname, param in base.get_submodule(name).named_parameters():
                    same = torch.equal(merged_params[f"{name}.{pname}"], param)
                    assert same != (expert in chosen and param.abs().sum() > 0) or expert not in chosen
            continue
        for target in layer.delta_targets:
            base_views = layer.layout.expert_views(base.get_submodule(target))
            merged_views = layer.layout.expert_views(merged.get_submodule(target))
            for name, view in base_views.items():
                for expert in range(layer.num_experts):
                    if expert not in chosen:
                        assert torch.equal(merged_views[name][expert], view[expert]), (key, name, expert)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merge_and_unload_gives_plain_model_with_base_layout(family, tmp_path):
    pristine = make_model(family)
    pristine.save_pretrained(tmp_path / "base")
    base_keys = set(safetensors_layout(next((tmp_path / "base").glob("*.safetensors")))[0]) - {"__metadata__"}
    model, _ = adapted(family)
    adapter_out = logits(model)
    experts = model.peft_config["default"].experts
    merged = model.merge_and_unload()
    assert type(merged) is type(pristine)
    assert not any(isinstance(m, ESFTLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), adapter_out, atol=MERGE_ATOL, rtol=0)
    _unselected_experts_equal(family, merged, pristine, experts)
    merged.save_pretrained(tmp_path / "merged")
    merged_keys = set(safetensors_layout(next((tmp_path / "merged").glob("*.safetensors")))[0]) - {"__metadata__"}
    assert merged_keys == base_keys
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(reloaded), logits(merged))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unload_returns_pristine_base(family):
    pristine = state_copy(make_model(family))
    model, reference = adapted(family)
    base = model.unload()
    assert not any(isinstance(m, ESFTLayer) for m in base.modules())
    state = base.state_dict()
    assert state.keys() == pristine.keys() and all(torch.equal(state[k], v) for k, v in pristine.items())
    assert torch.equal(logits(base), reference)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_multiple_adapters(family, tmp_path):
    model, reference = adapted(family)
    first = logits(model)
    base = model.get_base_model()
    model.add_adapter("other", ESFTConfig(experts=selection(base, variant=1)))
    model.set_adapter("other")
    assert torch.equal(logits(model), reference)  # new adapter starts at zero
    assert all(".esft_delta.other." in n for n, p in model.named_parameters() if p.requires_grad)
    train_steps(model, seed=3)
    second = logits(model)
    assert not torch.equal(second, first)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)
    model.save_pretrained(tmp_path)  # default at the root, "other" in a subfolder
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".esft_delta.other." in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), first)
    model.load_adapter(tmp_path / "other", adapter_name="again")
    model.set_adapter("again")
    assert torch.equal(logits(model), second)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_weighted_adapter_union_and_weighted_sum(family):
    model, _ = adapted(family)
    base = model.get_base_model()
    model.add_adapter("other", ESFTConfig(experts=selection(base, variant=1)))
    model.set_adapter("other")
    train_steps(model, seed=5)
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "union")
    model.add_weighted_adapter(["default", "other"], [0.25, 2.0], "mix")
    for layer in (m for m in model.modules() if isinstance(m, ESFTLayer)):
        sources = [a for a in ("default", "other") if a in layer.esft_delta]
        for name in layer.esft_delta["union"]:
            if hasattr(layer, "esft_expert_ids"):
                for row, expert in enumerate(layer.esft_expert_ids["union"]):
                    parts = [(a, layer.esft_expert_ids[a].index(expert)) for a in sources if expert in layer.esft_expert_ids[a]]
                    union = sum(layer.esft_delta[a][name][r] for a, r in parts)
                    mix = sum({"default": 0.25, "other": 2.0}[a] * layer.esft_delta[a][name][r] for a, r in parts)
                    torch.testing.assert_close(layer.esft_delta["union"][name][row], union, atol=0, rtol=0)
                    torch.testing.assert_close(layer.esft_delta["mix"][name][row], mix, atol=0, rtol=0)
            else:
                union = sum(layer.esft_delta[a][name] for a in sources)
                torch.testing.assert_close(layer.esft_delta["union"][name], union, atol=0, rtol=0)
    model.set_adapter("union")
    union_out = logits(model)
    model.base_model.set_adapter(["default", "other"])
    # Same deltas (checked exactly above); experts may be visited in another order, so sums can round differently.
    torch.testing.assert_close(logits(model), union_out, atol=1e-6, rtol=0)


def test_fresh_process_reload_is_exact_on_every_family(tmp_path):
    folders = {}
    for family in FAMILY_NAMES:
        model, _ = adapted(family)
        folder = tmp_path / family
        model.save_pretrained(folder)
        torch.save(logits(model), folder / "expected.pt")
        folders[family] = str(folder)
    runs = {family: (family, None, folder) for family, folder in folders.items()}
    assert reload_in_fresh_process("tiny_families:make_model", runs) == {family: True for family in FAMILY_NAMES}


FUSED_FAMILIES = [f for f in FAMILY_NAMES if {l.kind for l in find_moe_layers(make_model(f)).values()} == {"fused"}]


@pytest.mark.parametrize("family", FUSED_FAMILIES[:6] + ["gpt_oss"] if "gpt_oss" not in FUSED_FAMILIES[:6] else FUSED_FAMILIES[:6])
def test_every_experts_implementation_and_gradient_checkpointing(family):
    model, reference = adapted(family)
    base = model.get_base_model()
    results = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        base.set_experts_implementation(implementation)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model), reference, atol=1e-5, rtol=0)
        results[implementation] = logits(model)
        if implementation == "grouped_mm":
            with model.disable_adapter():
                assert torch.equal(logits(model), reference)
    for implementation, out in results.items():
        torch.testing.assert_close(out, results["grouped_mm"], atol=1e-5, rtol=0, msg=implementation)

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(11))
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in delta_params(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
