"""peft's own generic method tests (``PeftCommonTester``, vendored under tests/peft_common/) run against PESC.

Wired as for ESFT (tests/test_peft_conformance.py, whose list of generic tests is reused) on four tiny dense
families, PESC with and without its LoRA part. Tests that cannot apply are skipped with the reason; tests of what
PESC refuses by design (merging) check that the refusal is the clear error.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from esft_peft import PESCConfig
from peft_common.testing_common import PeftCommonTester
from peft_common.testing_utils import set_init_weights_false
from test_peft_conformance import ALIASES, GENERIC_TESTS, _one_thread  # noqa: F401  (the fixture is used)
from tiny_dense import make_dense_model

FAMILIES = ["llama", "qwen2", "mistral", "phi3"]

CONFIGS = {
    "pesc": dict(task_type="CAUSAL_LM", num_experts=4, top_k=2, adapter_dim=8),
    # the paper's LoRA part, on the attention and on the MLP linears that the upcycled MLP wraps
    "pesc+lora": dict(task_type="CAUSAL_LM", num_experts=4, top_k=2, adapter_dim=8, lora_r=4, lora_alpha=8),
}

NOT_APPLICABLE = {
    "_test_save_pretrained_pickle": "by design: esft-peft never loads pickle (torch.load only with weights_only), "
    "so an adapter saved with safe_serialization=False cannot be loaded back",
    "_test_save_pretrained_selected_adapters_pickle": "by design: esft-peft never loads pickle (see "
    "_test_save_pretrained_pickle)",
    "_test_lora_conversion": "PESC offers no conversion to LoRA (routed adapter experts are input-dependent); peft's "
    "test would return without checking anything",
}

# PESC refuses to merge (every token has its own routed experts, no weight matrix reproduces the layer): these
# tests must meet that clear error (merge_lora() folds the LoRA part only; tested in tests/test_pesc_core.py).
REFUSES_MERGE = {
    "_test_merge_layers", "_test_merge_layers_multi", "_test_merge_layers_nan", "_test_merge_layers_fp16",
    "_test_merge_layers_is_idempotent", "_test_safe_merge",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """family -> directory of a saved tiny dense checkpoint (the ``model_id`` peft's tests load)."""
    paths = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        make_dense_model(family, num_hidden_layers=3).save_pretrained(path)
        paths[family] = str(path)
    return paths


class TestPESCConformance(PeftCommonTester):
    transformers_class = AutoModelForCausalLM

    def prepare_inputs_for_testing(self):
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @pytest.mark.parametrize("config_name", list(CONFIGS))
    @pytest.mark.parametrize("family", FAMILIES)
    @pytest.mark.parametrize("test", list(GENERIC_TESTS))
    def test_generic(self, test, family, config_name, checkpoints):
        if test in NOT_APPLICABLE:
            pytest.skip(NOT_APPLICABLE[test])
        kwargs, init_weights_false = GENERIC_TESTS[test]
        config_kwargs = dict(CONFIGS[config_name])
        if init_weights_false:
            config_kwargs = set_init_weights_false(PESCConfig, config_kwargs)
        method = getattr(self, ALIASES.get(test, test))
        args = ("", checkpoints[family]) if test == "_test_passing_input_embeds_works" else (checkpoints[family],)
        if test in REFUSES_MERGE:
            with pytest.raises(ValueError, match="cannot be merged"):
                method(*args, PESCConfig, config_kwargs, **kwargs)
            return
        method(*args, PESCConfig, config_kwargs, **kwargs)
