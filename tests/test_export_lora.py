"""Export to peft LoRA (``export_lora`` / ``esft-peft export-lora``), checked against peft's own LoRA."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from esft_peft import ESFTConfig, export_lora
from esft_peft.interop.export_lora import error_table
from esft_helpers import logits, selection, train_steps
from tiny_families import make_model

# fused plain (qwen3-moe, mixtral), fused with shared experts and a dense first layer (deepseek-v2), fused transposed
# with biases (gpt-oss), ModuleList experts (ordinary target_modules)
FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v2", "gpt_oss", "modulelist"]


def _saved_adapter(family: str, tmp_path, rank=4, alpha=8.0, init_weights=False, **extra):
    model = make_model(family)
    config = ESFTConfig(experts=selection(model), delta_rank=rank, delta_alpha=alpha, init_weights=init_weights,
                        **extra)
    peft_model = get_peft_model(model, config)
    if init_weights:
        train_steps(peft_model, steps=2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "esft")
    return peft_model, tmp_path / "esft"


@pytest.mark.parametrize("family", FAMILIES)
def test_low_rank_export_is_exact_against_peft_lora(family, tmp_path):
    esft, adapter_dir = _saved_adapter(family, tmp_path)
    expected = logits(esft)
    result = export_lora(adapter_dir, tmp_path / "lora", base_model=make_model(family))
    assert result.exact and result.rank == 4 and result.alpha == 8.0 and result.max_error == 0.0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert not config["modules_to_save"]
    if family == "modulelist":
        assert config["target_parameters"] is None
        assert config["target_modules"] and all(".experts." in name for name in config["target_modules"])
    else:
        assert config["target_parameters"] and all(
            name.rpartition(".")[2] in ("gate_up_proj", "down_proj") for name in config["target_parameters"]
        )
    lora = PeftModel.from_pretrained(make_model(family), str(tmp_path / "lora"))
    assert type(lora.base_model).__name__ == "LoraModel"
    torch.testing.assert_close(logits(lora), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, logits(make_model(family)), atol=1e-4)  # the adapter changes the outputs


def test_fused_export_layout_is_peft_param_wrapper_blocks(tmp_path):
    """Expert-major lora_A rows, rank-major lora_B columns (``j * E + e``), zeros for unselected experts; the first
    registered parameter (gate_up_proj) is the inner wrapper (``experts.base_layer``)."""
    esft, adapter_dir = _saved_adapter("qwen3_moe", tmp_path, rank=2, alpha=2.0)
    export_lora(adapter_dir, tmp_path / "lora", base_model=make_model("qwen3_moe"))
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.mlp.experts."
    layer = esft.base_model.model.model.layers[0].mlp.experts
    ids, E, r = layer.esft_expert_ids["default"], 8, 2
    for wrapper, param in (("base_layer.", "gate_up_proj"), ("", "down_proj")):
        A, B = tensors[f"{prefix}{wrapper}lora_A.weight"], tensors[f"{prefix}{wrapper}lora_B.weight"]
        source_A, source_B = layer.esft_lora_A["default"][param], layer.esft_lora_B["default"][param]
        assert A.shape == (E * r, source_A.shape[-1]) and B.shape == (source_B.shape[-2], r * E)
        for e in range(E):
            block_A, block_B = A[e * r : (e + 1) * r], B[:, e::E]
            if e in ids:
                assert torch.equal(block_A, source_A[ids.index(e)]) and torch.equal(block_B, source_B[ids.index(e)])
            else:
                assert torch.count_nonzero(block_A) == 0 and torch.count_nonzero(block_B) == 0


@pytest.mark.parametrize("family", ["qwen3_moe", "modulelist"])
def test_full_rank_export_truncates_by_svd_and_reports_errors(family, tmp_path, caplog):
    esft, adapter_dir = _saved_adapter(family, tmp_path, rank=None, alpha=None)
    expected = logits(esft)
    full = export_lora(adapter_dir, tmp_path / "full", rank=64, base_model=make_model(family))
    assert full.max_error < 1e-6  # rank >= the matrices' rank: the SVD reproduces the deltas
    lora = PeftModel.from_pretrained(make_model(family), str(tmp_path / "full"))
    torch.testing.assert_close(logits(lora), expected, rtol=0, atol=1e-4)

    with caplog.at_level(logging.INFO, logger="esft_peft"):
        low = export_lora(adapter_dir, tmp_path / "low", rank=2, base_model=make_model(family))
    assert "max relative error" in caplog.text
    assert not low.exact and low.rank == 2
    num_matrices = sum(len(ids) for ids in esft.peft_config["default"].experts.values()) * (
        3 if family == "modulelist" else 2)
    assert len(low.errors) == num_matrices
    # each reported error is the SVD truncation error of that expert's delta, recomputed here
    layer_key, expert, param = next(iter(low.errors))
    if family == "modulelist":
        module = esft.base_model.model.model.layers[int(layer_key)].mlp.experts[expert]
        delta = getattr(module, param.split(".")[0]).esft_delta["default"]["weight"]
    else:
        module = esft.base_model.model.get_submodule(f"model.layers.{layer_key}.mlp.experts")
        delta = module.esft_delta["default"][param][module.esft_expert_ids["default"].index(expert)]
    S = torch.linalg.svdvals(delta.double())
    assert low.errors[(layer_key, expert, param)] == pytest.approx((S[2:].pow(2).sum() / S.pow(2).sum()).sqrt().item())
    assert "| layer | expert | parameter | relative error |" in error_table(low)


def test_rank_none_picks_the_smallest_rank_under_the_stated_error(tmp_path):
    _, adapter_dir = _saved_adapter("qwen3_moe", tmp_path, rank=None, alpha=None)
    chosen = export_lora(adapter_dir, tmp_path / "auto", max_error=0.3, base_model=make_model("qwen3_moe"))
    assert chosen.max_error <= 0.3
    below = export_lora(adapter_dir, tmp_path / "below", rank=chosen.rank - 1, base_model=make_model("qwen3_moe"))
    assert below.max_error > 0.3


def test_shared_experts_are_refused_or_skipped_with_a_warning(tmp_path, caplog):
    _, adapter_dir = _saved_adapter("deepseek_v2", tmp_path, train_shared_experts=True)
    with pytest.raises(ValueError, match="shared_experts.*skip_non_expert"):
        export_lora(adapter_dir, tmp_path / "refused", base_model=make_model("deepseek_v2"))
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.WARNING):
        result = export_lora(adapter_dir, tmp_path / "skipped", base_model=make_model("deepseek_v2"),
                             skip_non_expert=True)
    assert "left out" in caplog.text and result.exact
    assert not any("shared" in key for key in load_file(str(tmp_path / "skipped" / "adapter_model.safetensors")))


def test_export_needs_a_known_base_and_a_valid_rank(tmp_path):
    _, adapter_dir = _saved_adapter("qwen3_moe", tmp_path)
    with pytest.raises(ValueError, match="base_model"):
        export_lora(adapter_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="rank"):
        export_lora(adapter_dir, tmp_path / "out", rank=0, base_model=make_model("qwen3_moe"))


def test_base_built_on_the_meta_device_from_its_directory(tmp_path):
    base = make_model("mixtral")
    base.save_pretrained(tmp_path / "base")
    esft, adapter_dir = _saved_adapter("mixtral", tmp_path)
    result = export_lora(adapter_dir, tmp_path / "lora", base_model=str(tmp_path / "base"))
    lora = PeftModel.from_pretrained(make_model("mixtral"), str(tmp_path / "lora"))
    torch.testing.assert_close(logits(lora), logits(esft), rtol=0, atol=1e-5)
    assert result.adapter_bytes == (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size


def test_cli_export_lora(tmp_path, capsys):
    from esft_peft.cli.main import main

    base = make_model("qwen3_moe")
    base.save_pretrained(tmp_path / "base")
    _, adapter_dir = _saved_adapter("qwen3_moe", tmp_path, rank=None, alpha=None)
    code = main(["export-lora", "--adapter", str(adapter_dir), "--base", str(tmp_path / "base"),
                 "--out", str(tmp_path / "lora"), "--rank", "3"])
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "rank 3" in out and "relative error" in out
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 3


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_per_expert_layout_gives_each_experts_official_weights(family, tmp_path):
    """``layout="per_expert"``: per expert, base + scaling * lora_B @ lora_A is the expert's full weight as the
    official-format export writes it (an independent path: fused rows -> gate/up/down)."""
    from esft_peft.interop.official import official_state_dict

    esft, adapter_dir = _saved_adapter(family, tmp_path)
    expected = official_state_dict(esft)
    base = make_model(family)
    result = export_lora(adapter_dir, tmp_path / "lora", base_model=base, layout="per_expert")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_parameters"] is None and len(config["target_modules"]) == len(expected)
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    scaling = result.alpha / result.rank
    base_state = {}
    for key in expected:  # model.layers.{l}.mlp.experts.{e}.{projection}.weight
        _, _, layer, _, _, expert, projection, _ = key.split(".")
        experts = base.model.layers[int(layer)].mlp.experts
        inter = experts.down_proj.shape[-1]
        fused = {"gate_proj": experts.gate_up_proj[int(expert)][:inter],
                 "up_proj": experts.gate_up_proj[int(expert)][inter:], "down_proj": experts.down_proj[int(expert)]}
        base_state[key] = fused[projection]
    for key, full in expected.items():
        module = key.removesuffix(".weight")
        A, B = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
        assert A.shape[0] == B.shape[1] == result.rank
        torch.testing.assert_close(base_state[key] + scaling * B @ A, full, rtol=0, atol=1e-6)


def test_per_expert_layout_refuses_interleaved_gate_up(tmp_path):
    _, adapter_dir = _saved_adapter("gpt_oss", tmp_path)
    with pytest.raises(ValueError, match="per-expert export needs gate and up concatenated"):
        export_lora(adapter_dir, tmp_path / "lora", base_model=make_model("gpt_oss"), layout="per_expert")
    with pytest.raises(ValueError, match="layout"):
        export_lora(adapter_dir, tmp_path / "lora", base_model=make_model("gpt_oss"), layout="3d")
