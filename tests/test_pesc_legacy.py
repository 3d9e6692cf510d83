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
def test_legacy_pesc_adapter_loads_with_transformers_load_adapter(name):
    folder = LEGACY / f"pesc_{name}"
    expected = load_file(str(folder / "expected_outputs.safetensors"))
    model = make_dense_model("llama", seed=0)
    model.load_adapter(str(folder))
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
