"""peft's own generic method tests (``PeftCommonTester``, vendored under tests/peft_common/) run against ESFT.

Wired as peft wires them (tests/peft_common/conformance.py, shared with PESC's run). Tiny MoE checkpoints of
two families are saved once and loaded by path, as peft loads its tiny Hub models. Tests whose expectation is
LoRA-only or against an ESFT design decision are skipped with the reason (docs/faq.md lists them).
"""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from esft_peft import ESFTConfig
from peft_common.conformance import GENERIC_TESTS, PICKLE_TESTS, MethodConformance, save_checkpoints
from peft_common.conformance import _one_thread  # noqa: F401  (an autouse fixture)
from tiny_families import make_model

# Two families with fused experts (the transformers 5 layout) that differ where ESFT can differ: qwen3_moe (MoE in
# every layer, no shared experts) and deepseek_v2 (a dense first layer, shared experts, MLA attention).
FAMILIES = ["qwen3_moe", "deepseek_v2"]

# The config variants: routed experts only (ExpertsDeltaLayer), and a few experts plus non-expert modules
# (ModuleDeltaLayer too). Layers 1 and 2 are MoE layers of both families (qwen3_moe gets 3 layers here).
CONFIGS = {
    "experts": dict(task_type="CAUSAL_LM", experts={1: [0, 2, 3, 5, 7], 2: [1, 2, 4, 6]}),
    "experts+modules": dict(
        task_type="CAUSAL_LM", experts={1: [2, 6]}, train_non_expert_modules=["self_attn.o_proj", "norm"]
    ),
}

# Tests whose expectation does not apply to ESFT, with the reason (also in docs/faq.md).
NOT_APPLICABLE = {
    **PICKLE_TESTS,
    "_test_lora_conversion": "ESFT offers no conversion to LoRA (supports_lora_conversion() is False: full-rank "
    "per-expert deltas); peft's test would return without checking anything",
}

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return save_checkpoints(tmp_path_factory, FAMILIES, make_model)


class TestESFTConformance(MethodConformance):
    transformers_class = AutoModelForCausalLM

    @pytest.mark.parametrize("config_name", list(CONFIGS))
    @pytest.mark.parametrize("family", FAMILIES)
    @pytest.mark.parametrize("test", list(GENERIC_TESTS))
    def test_generic(self, test, family, config_name, checkpoints):
        self.run_generic(test, checkpoints[family], ESFTConfig, CONFIGS[config_name], NOT_APPLICABLE)
