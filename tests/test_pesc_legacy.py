"""Adapters written by the release before PESC moved to its own ``pesc_`` prefix (keys ``lora_pesc_*``, committed
under tests/data/legacy/, see make_pesc_legacy.py there) load with today's code and give the outputs they gave then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import esft_peft  # noqa: F401  (registers PESC)
from tiny_dense import make_dense_model

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.mark.parametrize("name", ["plain", "lora"])
def test_legacy_pesc_adapter_loads_with_same_outputs(name):
    folder = LEGACY / f"pesc_{name}"
    expected = load_file(str(folder / "expected_outputs.safetensors"))
    model = PeftModel.from_pretrained(make_dense_model("llama", seed=0), str(folder)).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["plain", "lora"])
def test_legacy_pesc_adapter_resaved_loads_with_transformers_load_adapter(name, tmp_path):
    """transformers' load_adapter names weights by the method's prefix, so it reads only ``pesc_*`` keys: a legacy
    file loads through peft, and once re-saved, through transformers too."""
    folder = LEGACY / f"pesc_{name}"
    expected = load_file(str(folder / "expected_outputs.safetensors"))
    PeftModel.from_pretrained(make_dense_model("llama", seed=0), str(folder)).save_pretrained(tmp_path)
    model = make_dense_model("llama", seed=0)
    model.load_adapter(str(tmp_path))
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def test_legacy_pesc_adapter_resaves_with_pesc_keys(tmp_path):
    from safetensors import safe_open

    PeftModel.from_pretrained(make_dense_model("llama", seed=0), str(LEGACY / "pesc_lora")).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert not any("lora_pesc" in key for key in keys)
    assert sum(key.endswith((".pesc_router.weight", ".pesc_down", ".pesc_up")) for key in keys) == 6
    assert sum(key.endswith((".pesc_lora_A.weight", ".pesc_lora_B.weight")) for key in keys) == 8
    assert all(".pesc_" in key for key in keys)  # one prefix for every key PESC saves
