"""Adapters written by the release before the peft-grade tuners (``esft_delta`` keys, that release's
``adapter_config.json`` fields) keep loading, and give the outputs they gave then (tests/data/legacy/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tiny_families import make_model

LEGACY = Path(__file__).parent / "data" / "legacy"
sys.path.insert(0, str(LEGACY))
from make_legacy_esft import LEGACY_CASES  # noqa: E402


@pytest.mark.parametrize("name", sorted(LEGACY_CASES))
def test_legacy_esft_adapter_loads_and_reproduces_its_outputs(name):
    family, seed, _ = LEGACY_CASES[name]
    expected = load_file(str(LEGACY / f"esft_{name}" / "expected.safetensors"))
    base = make_model(family, seed=seed)
    with torch.no_grad():
        base_logits = base(input_ids=expected["input_ids"]).logits
    # The base is rebuilt from its config and seed; if this fails, the rebuild changed, not the adapter format.
    torch.testing.assert_close(base_logits, expected["base_logits"], rtol=0, atol=1e-6)
    model = PeftModel.from_pretrained(base, LEGACY / f"esft_{name}")
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    assert (expected["logits"] - expected["base_logits"]).abs().max() > 1e-3  # the deltas do change the outputs
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
