"""Low-rank expert deltas (``ESFTConfig(delta_rank=r, delta_alpha=a)``): ``W[e] + (a / r) * B[e] @ A[e]``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from esft_peft import ESFTConfig, ExpertsDeltaLayer, ModuleDeltaLayer, find_moe_layers
from esft_peft.interop.official import official_state_dict
from esft_helpers import assert_reproduces_base, batch, demo_workspace, logits, selection, train_steps
from tiny_families import make_model

# fused (plain, gpt-oss transposed with biases, deepseek-v2 with shared experts), ModuleList, and the layouts outside
# transformers' experts interface (dbrx, jetmoe, llama4)
FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v2", "gpt_oss", "modulelist", "dbrx", "jetmoe", "llama4_text"]
RANK, ALPHA = 4, 8.0


def _low_rank(family: str, init_weights: bool = False, rank: int = RANK, alpha: float = ALPHA, **extra):
    model = make_model(family)
    config = ESFTConfig(experts=selection(model), delta_rank=rank, delta_alpha=alpha, init_weights=init_weights,
                        **extra)
    return get_peft_model(model, config)


def _factor_owners(peft_model, adapter: str = "default"):
    """(module name, tuner layer) of every layer holding low-rank factors of ``adapter``."""
    return [(name, module) for name, module in peft_model.base_model.model.named_modules()
            if isinstance(module, (ExpertsDeltaLayer, ModuleDeltaLayer)) and adapter in module.esft_lora_A
            and len(module.esft_lora_A[adapter])]


def _reference(family: str, peft_model, adapter: str = "default", scale: float = ALPHA / RANK):
    """The base with ``W[e] + s * B @ A`` written into the selected experts directly (independent of the tuner's
    forming, merging and compute)."""
    reference = make_model(family)
    with torch.no_grad():
        for name, layer in _factor_owners(peft_model, adapter):
            target = reference.get_submodule(name)
            for param, A in layer.esft_lora_A[adapter].items():
                B = layer.esft_lora_B[adapter][param]
                update = torch.matmul(B, A) * scale
                if isinstance(layer, ExpertsDeltaLayer):
                    views = layer.layout.expert_views(target)
                    index = torch.tensor(layer.esft_expert_ids[adapter])
                    views[param][index] = (views[param][index].float() + update).to(views[param].dtype)
                else:
                    weight = getattr(target, param)
                    weight.copy_((weight.float() + update).to(weight.dtype))
    return reference.eval()


# ------------------------------------------------------------------------------------------------ config


def test_config_fields_defaults_and_round_trip(tmp_path):
    assert ESFTConfig(experts={1: [0]}).delta_rank is None
    config = ESFTConfig(experts={1: [0]}, delta_rank=8)
    assert config.delta_alpha == 8  # default alpha = rank: scale 1
    config = ESFTConfig(experts={1: [0]}, delta_rank=8, delta_alpha=16)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["delta_rank"], saved["delta_alpha"]) == (8, 16)
    loaded = ESFTConfig.from_pretrained(str(tmp_path))
    assert (loaded.delta_rank, loaded.delta_alpha) == (8, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta_rank=0), "delta_rank"),
    (dict(delta_rank=-2), "delta_rank"),
    (dict(delta_rank=2.5), "delta_rank"),
    (dict(delta_rank=True), "delta_rank"),
    (dict(delta_alpha=4), "delta_alpha.*delta_rank"),
    (dict(delta_rank=4, delta_alpha=0), "delta_alpha"),
    (dict(delta_rank=4, delta_alpha="big"), "delta_alpha"),
])
def test_config_rejects_bad_rank_and_alpha(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESFTConfig(experts={1: [0]}, **kwargs)


# ------------------------------------------------------------------------------------------------ shapes, init


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "modulelist"])
def test_factor_shapes_and_peft_init(family):
    model = _low_rank(family, init_weights=True)
    owners = _factor_owners(model)
    assert owners
    for _, layer in owners:
        for param, A in layer.esft_lora_A["default"].items():
            B = layer.esft_lora_B["default"][param]
            if isinstance(layer, ExpertsDeltaLayer):
                k = len(layer.esft_expert_ids["default"])
                full = layer.layout.expert_views(layer.get_base_layer())[param]
                assert A.shape == (k, RANK, full.shape[-1]) and B.shape == (k, full.shape[-2], RANK)
                fan_in = full.shape[-1]
            else:
                weight = getattr(layer.get_base_layer(), param)
                assert A.shape == (RANK, weight.shape[1]) and B.shape == (weight.shape[0], RANK)
                fan_in = weight.shape[1]
            assert torch.count_nonzero(B) == 0  # peft's init: B zero, so a fresh adapter is exact
            bound = 1 / math.sqrt(fan_in)  # kaiming-uniform with a = sqrt(5), as LoRA's lora_A
            assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
            assert A.requires_grad and B.requires_grad
        assert param not in layer.esft_delta["default"]  # no dense delta for a low-rank matrix
    # biases are not trained under low rank (gpt-oss): nothing but the factors is trainable
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".esft_lora_A." in n or ".esft_lora_B." in n for n in trainable)


def test_adapter_is_smaller_than_full_rank():
    full = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [0, 1], 1: [2]}))
    low = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [0, 1], 1: [2]}, delta_rank=2))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    # per expert: gate_up (32, 32) and down (32, 16) -> full 1536, rank 2: 2*(32+32) + 2*(32+16) = 224
    assert count(full) == 3 * 1536 and count(low) == 3 * 224


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_reproduces_the_base(family):
    expected = logits(make_model(family))
    model = _low_rank(family, init_weights=True)
    assert_reproduces_base(family, logits(model), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_the_base_with_w_plus_sba(family):
    model = _low_rank(family)
    assert _factor_owners(model)
    actual, expected = logits(model), logits(_reference(family, model))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(actual, logits(make_model(family)), atol=1e-4)  # the update changes the outputs


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "modulelist", "dbrx"])
def test_training_updates_both_factors_and_merge_is_exact(family):
    model = _low_rank(family, init_weights=True)
    train_steps(model, steps=3)
    for _, layer in _factor_owners(model):
        for param, B in layer.esft_lora_B["default"].items():
            assert torch.count_nonzero(B) > 0  # B got gradients (A's are zero while B is zero)
    adapter_logits = logits(model)
    torch.testing.assert_close(adapter_logits, logits(_reference(family, model)), rtol=0, atol=1e-5)
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "esft_" not in k}
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapter_logits, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "esft_" not in k}
    assert all(torch.equal(base_state[k], after[k]) for k in base_state)  # unmerge restores the base bit for bit
    with model.disable_adapter():
        assert_reproduces_base(family, logits(model), logits(make_model(family)))


@pytest.mark.parametrize("family", ["qwen3_moe", "modulelist"])
def test_bf16_base_keeps_fp32_factors_and_its_merge_reproduces_the_adapter_exactly(family):
    """The dtype policy of full-rank deltas: fp32 factors on a bf16 base, ``W + s * B @ A`` summed in fp32 and rounded
    once to bf16, in the forward and in the merge alike."""
    base = make_model(family, dtype=torch.bfloat16)
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts=selection(base), delta_rank=RANK, delta_alpha=ALPHA))
    assert {p.dtype for n, p in model.named_parameters() if "esft_lora_" in n} == {torch.float32}
    assert torch.equal(logits(model), reference)  # fresh: exact
    train_steps(model, lr=1e-2)
    adapted = logits(model)
    assert adapted.dtype == torch.bfloat16 and not torch.equal(adapted, reference)
    assert torch.equal(logits(model.merge_and_unload()), adapted)


def test_merged_weights_are_w_plus_sba_formed_like_the_forward():
    model = _low_rank("qwen3_moe")
    layer = next(layer for _, layer in _factor_owners(model) if isinstance(layer, ExpertsDeltaLayer))
    ids = layer.esft_expert_ids["default"]
    before = layer.get_base_layer().gate_up_proj[ids].clone()
    A, B = layer.esft_lora_A["default"]["gate_up_proj"], layer.esft_lora_B["default"]["gate_up_proj"]
    model.merge_adapter()
    expected = (before.float() + torch.matmul(B, A) * (ALPHA / RANK)).to(before.dtype)
    assert torch.equal(layer.get_base_layer().gate_up_proj[ids], expected)


def test_backward_keeps_no_dense_update_between_forward_and_backward():
    """The formed weights are formed again in backward: what autograd saves for a low-rank layer is no larger than
    for the full-rank layer (whose saved tensors hold no delta either)."""
    saved = {}
    for rank in (None, 2):
        model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: list(range(8))}, delta_rank=rank))
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        ids = batch(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        saved[rank] = sum(sizes)
    # full experts of one layer: 8 * (32*32 + 32*16) fp32 = 48 KiB; a dense update kept would add that much
    assert saved[2] <= saved[None] + 8 * 2 * (32 + 32 + 32 + 16) * 4


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("family", ["qwen3_moe", "modulelist", "deepseek_v2"])
def test_save_and_load_round_trip(family, tmp_path):
    extra = dict(train_shared_experts=True) if family == "deepseek_v2" else {}
    model = _low_rank(family, **extra)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(".esft_lora_A." in k for k in keys) and any(".esft_lora_B." in k for k in keys)
    if family == "deepseek_v2":  # shared experts keep full-rank module deltas
        assert any("shared_experts" in k and ".esft_delta." in k for k in keys)
        assert not any("shared_experts" in k and ".esft_lora_" in k for k in keys)
    loaded = PeftModel.from_pretrained(make_model(family), str(tmp_path))
    assert torch.equal(logits(loaded), expected)


def test_loading_factors_of_another_rank_is_refused_before_anything_is_copied(tmp_path):
    model = _low_rank("qwen3_moe")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["delta_rank"] = RANK + 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = make_model("qwen3_moe")
    with pytest.raises(ValueError, match="shape"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert torch.equal(logits(base), logits(make_model("qwen3_moe")))


def test_full_rank_file_under_a_low_rank_config_is_refused(tmp_path):
    get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1]}, init_weights=False)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["delta_rank"], config["delta_alpha"] = 2, 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not list|lacks"):
        PeftModel.from_pretrained(make_model("qwen3_moe"), str(tmp_path))


# ------------------------------------------------------------------------------------------------ several adapters


def test_several_low_rank_adapters_mixed_batch_and_weighted_combination():
    base = make_model("qwen3_moe")
    model = get_peft_model(base, ESFTConfig(experts={0: [0, 3], 1: [1]}, delta_rank=2, init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", ESFTConfig(experts={0: [3, 5]}, delta_rank=3, delta_alpha=6, init_weights=False))
    model.add_adapter("full", ESFTConfig(experts={1: [1, 2]}, init_weights=False))  # full rank beside low rank
    model.eval()
    names = ["a", "b", "__base__", "full", "a"]
    ids = batch(3, (len(names), 9))
    alone = {}
    for name in set(names):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    alone[name] = model(input_ids=ids).logits
            else:
                model.set_adapter(name)
                alone[name] = model(input_ids=ids).logits
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=0, atol=1e-6)
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-4)

    # a weighted combination of low-rank adapters is a full-rank adapter holding the weighted sum of the updates
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "ab")
    assert model.peft_config["ab"].delta_rank is None
    layer = model.base_model.model.model.layers[0].mlp.experts
    assert layer.esft_expert_ids["ab"] == [0, 3, 5]
    dense = lambda name: torch.matmul(layer.esft_lora_B[name]["down_proj"], layer.esft_lora_A[name]["down_proj"])  # noqa: E731
    a, b = dense("a") * 1.0, dense("b") * 2.0  # scales alpha/rank: a 2/2, b 6/3
    expected = torch.stack([0.5 * a[0], 0.5 * a[1] + 2.0 * b[0], 2.0 * b[1]])
    torch.testing.assert_close(layer.esft_delta["ab"]["down_proj"], expected, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------ interop


def test_official_export_writes_full_weights_w_plus_sba():
    model = _low_rank("qwen3_moe")
    reference = _reference("qwen3_moe", model)
    state = official_state_dict(model)
    layers = find_moe_layers(reference)
    for layer_key, ids in model.peft_config["default"].experts.items():
        experts = reference.get_submodule(layers[layer_key].experts_name)
        inter = experts.down_proj.shape[-1]
        for expert in ids:
            gate_up = experts.gate_up_proj[expert]
            assert torch.equal(state[f"model.layers.{layer_key}.mlp.experts.{expert}.gate_proj.weight"], gate_up[:inter])
            assert torch.equal(state[f"model.layers.{layer_key}.mlp.experts.{expert}.up_proj.weight"], gate_up[inter:])
            assert torch.equal(state[f"model.layers.{layer_key}.mlp.experts.{expert}.down_proj.weight"],
                               experts.down_proj[expert])


def test_hub_card_reports_rank_and_adapter_size(tmp_path):
    from esft_peft.interop.hub import model_card_text

    model = _low_rank("qwen3_moe")
    text = model_card_text(model)
    assert f"rank {RANK}" in text and "alpha" in text
    model.save_pretrained(tmp_path)
    from esft_peft.interop.hub import adapter_statistics

    stats = adapter_statistics(model)
    assert stats["adapter_parameters"] == sum(p.numel() for n, p in model.named_parameters() if "esft_lora_" in n)
    assert stats["adapter_bytes"] == 4 * stats["adapter_parameters"]  # fp32 tensors in the safetensors file


# ------------------------------------------------------------------------------------------------ command line


def test_cli_trains_low_rank_reports_size_and_exports_exactly(tmp_path, capsys):
    from esft_peft import demo
    from esft_peft.cli.main import main

    model = demo_workspace(tmp_path, 16)
    layer = next(iter(find_moe_layers(model)))
    (tmp_path / "expert_cfg.json").write_text(json.dumps({"experts": {layer: [0, 3]}, "shared_experts": False,
                                                          "non_expert_modules": False}))
    common = ["train", "--model", tmp_path / "model", "--data", tmp_path / "data.jsonl", "--expert-config",
              tmp_path / "expert_cfg.json", "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-2",
              "--no-gradient-checkpointing"]
    assert main([str(a) for a in common + ["--out", tmp_path / "x", "--delta-alpha", "4"]]) == 1
    assert "--delta-rank" in capsys.readouterr().err
    assert main([str(a) for a in common + ["--out", tmp_path / "x", "--delta-rank", "2",
                                           "--decay-expert-weights"]]) == 1
    assert "--decay-expert-weights" in capsys.readouterr().err

    assert main([str(a) for a in common + ["--out", tmp_path / "adapter", "--delta-rank", "2",
                                           "--delta-alpha", "4"]]) == 0
    out = capsys.readouterr().out
    assert "at rank 2 (alpha 4)" in out and "adapter)" in out and "of weights)" in out
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys and all(".esft_lora_A." in k or ".esft_lora_B." in k for k in keys)
    assert any(t.abs().sum() > 0 for k, t in keys.items() if ".esft_lora_B." in k)  # trained
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "rank 2, alpha 4" in card and "adapter size" in card

    assert main(["export-lora", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora")]) == 0
    assert "exact" in capsys.readouterr().out
    fresh = lambda: demo.build_model(demo.load_settings("quick"), seed=0)  # noqa: E731
    esft = PeftModel.from_pretrained(fresh(), str(tmp_path / "adapter"))
    lora = PeftModel.from_pretrained(fresh(), str(tmp_path / "lora"))
    ids = torch.randint(3, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, esft(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_miniature_low_rank_methods_train_fewer_parameters():
    from esft_peft.demo import build_model, load_settings
    from esft_peft.demo import synthetic_tasks as st
    from esft_peft.demo.methods import METHODS, prepare
    from esft_peft.demo.training import count_parameters, score_domain

    settings = load_settings("quick")
    base = build_model(settings, seed=0)
    scores = score_domain(base, st.build_tokenizer(), settings, "law")
    trained = {name: count_parameters(prepare(METHODS[name], base, scores), trainable=True)
               for name in ("ESFT-Token", "ESFT-Token r=8")}
    assert 0 < trained["ESFT-Token r=8"] < trained["ESFT-Token"]
    model = prepare(METHODS["ESFT-Token r=8"], base, scores)
    config = model.peft_config["default"]
    assert (config.delta_rank, config.delta_alpha) == (8, 16)


def test_scoring_a_low_rank_adapter_model_sees_the_adapted_routing():
    """Scoring runs on whatever model it is given: through a low-rank adapter it records the routing of
    ``W + s * B @ A`` (the reference model with those weights written in), and a fresh adapter scores as the base."""
    from esft_peft import score_experts

    ids = batch(7, (3, 12))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    score = lambda model: score_experts(model, batches, token_budget=None, show_progress=False).to_dict()  # noqa: E731
    model = _low_rank("deepseek_v2")
    adapted, reference = score(model), score(_reference("deepseek_v2", model))
    for kind in ("token_scores", "gate_scores"):
        assert adapted[kind].keys() == reference[kind].keys()
        for layer, values in adapted[kind].items():
            assert values == pytest.approx(reference[kind][layer], abs=1e-6)
    assert score(_low_rank("deepseek_v2", init_weights=True))["token_scores"] == score(make_model("deepseek_v2"))["token_scores"]
