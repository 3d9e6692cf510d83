"""peft's own generic method tests (``PeftCommonTester``, vendored under tests/peft_common/) run against PESC.

Wired as for ESFT (tests/peft_common/conformance.py) on four tiny dense families, PESC with and without its LoRA
part. Tests that cannot apply are skipped with the reason; tests of what
PESC refuses by design (merging) check that the refusal is the clear error.
"""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from esft_peft import PESCConfig
from peft_common.conformance import GENERIC_TESTS, PICKLE_TESTS, MethodConformance, save_checkpoints
from peft_common.conformance import _one_thread  # noqa: F401  (an autouse fixture)
from tiny_dense import make_dense_model

FAMILIES = ["llama", "qwen2", "mistral", "phi3"]

CONFIGS = {
    "pesc": dict(task_type="CAUSAL_LM", num_experts=4, top_k=2, adapter_dim=8),
    # the paper's LoRA part, on the attention and on the MLP linears that the upcycled MLP wraps
    "pesc+lora": dict(task_type="CAUSAL_LM", num_experts=4, top_k=2, adapter_dim=8, lora_r=4, lora_alpha=8),
}

NOT_APPLICABLE = {
    **PICKLE_TESTS,
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
    return save_checkpoints(tmp_path_factory, FAMILIES, make_dense_model)


class TestPESCConformance(MethodConformance):
    transformers_class = AutoModelForCausalLM

    @pytest.mark.parametrize("config_name", list(CONFIGS))
    @pytest.mark.parametrize("family", FAMILIES)
    @pytest.mark.parametrize("test", list(GENERIC_TESTS))
    def test_generic(self, test, family, config_name, checkpoints):
        self.run_generic(test, checkpoints[family], PESCConfig, CONFIGS[config_name], NOT_APPLICABLE,
                         refused=(REFUSES_MERGE, "cannot be merged"))
