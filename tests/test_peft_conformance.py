"""peft's own generic method tests (``PeftCommonTester``, vendored under tests/peft_common/) run against ESFT.

Wired as peft's tests/test_decoder_models.py wires them (its per-test preparation, e.g. ``set_init_weights_false``,
is repeated here), plus the generic tests that peft wires in tests/test_custom_models.py. Tiny MoE checkpoints of
two families are saved once and loaded by path, as peft loads its tiny Hub models. Tests whose expectation is
LoRA-only or against an ESFT design decision are skipped with the reason (docs/faq.md lists them).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from esft_peft import ESFTConfig
from peft_common.testing_common import PeftCommonTester
from peft_common.testing_utils import set_init_weights_false
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

# method of PeftCommonTester -> (extra keyword arguments, whether peft's wiring sets init_weights=False)
GENERIC_TESTS = {
    "_test_model_attr": ({}, False),
    "_test_adapter_name": ({}, False),
    "_test_prepare_for_training": ({}, False),
    "_test_save_pretrained": ({}, True),
    "_test_save_pretrained_pickle": ({"safe_serialization": False}, True),
    "_test_save_pretrained_selected_adapters": ({}, True),
    "_test_save_pretrained_selected_adapters_pickle": ({"safe_serialization": False}, True),
    "_test_save_pretrained_adapter_name_substring": ({}, True),
    "_test_load_model_low_cpu_mem_usage": ({}, False),
    "_test_from_pretrained_config_construction": ({}, False),
    "_test_load_multiple_adapters": ({}, False),
    "_test_merge_layers": ({}, True),
    "_test_merge_layers_multi": ({}, True),
    "_test_merge_layers_nan": ({}, True),
    "_test_merge_layers_fp16": ({}, False),
    "_test_merge_layers_is_idempotent": ({}, True),
    "_test_safe_merge": ({}, True),
    "_test_mixed_adapter_batches": ({}, True),
    "_test_generate_with_mixed_adapter_batches_and_beam_search": ({}, True),
    "_test_generate": ({}, False),
    "_test_generate_pos_args": ({"raises_err": False}, False),
    "_test_generate_half_prec": ({}, False),
    "_test_training": ({}, False),
    "_test_training_layer_indexing": ({}, False),
    "_test_training_gradient_checkpointing": ({"use_reentrant": True}, False),
    "_test_training_gradient_checkpointing_non_reentrant": ({"use_reentrant": False}, False),
    "_test_inference_safetensors": ({}, False),
    "_test_peft_model_device_map": ({}, False),
    "_test_delete_adapter": ({}, False),
    "_test_delete_inactive_adapter": ({}, False),
    "_test_delete_unknown_adapter_raises": ({}, False),
    "_test_adding_multiple_adapters_with_bias_raises": ({}, False),
    "_test_unload_adapter": ({}, True),
    "_test_weighted_combination_of_adapters": ({}, True),
    "_test_training_prompt_learning_tasks": ({}, False),
    "_test_disable_adapter": ({}, True),
    "_test_passing_input_embeds_works": ({}, False),
    "_test_lora_conversion": ({}, True),
    "_test_get_base_model_state_dict": ({}, False),
}

# Tests whose expectation does not apply to ESFT, with the reason (also in docs/faq.md).
NOT_APPLICABLE = {
    "_test_save_pretrained_pickle": "by design: esft-peft never loads pickle (torch.load only with weights_only), "
    "so an adapter saved with safe_serialization=False cannot be loaded back",
    "_test_save_pretrained_selected_adapters_pickle": "by design: esft-peft never loads pickle (see "
    "_test_save_pretrained_pickle)",
    "_test_lora_conversion": "ESFT offers no conversion to LoRA (supports_lora_conversion() is False: full-rank "
    "per-expert deltas); peft's test would return without checking anything",
}

ALIASES = {"_test_save_pretrained_pickle": "_test_save_pretrained",
               "_test_save_pretrained_selected_adapters_pickle": "_test_save_pretrained_selected_adapters",
               "_test_training_gradient_checkpointing_non_reentrant": "_test_training_gradient_checkpointing"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny models run hundreds of small ops per generate(); with more threads than free cores (two pytest
    workers on two cores) torch's thread pool spins and a generate() takes seconds instead of ~50 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """family -> directory of a saved tiny checkpoint (the ``model_id`` peft's tests load with from_pretrained)."""
    paths = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        make_model(family, num_hidden_layers=3).save_pretrained(path)
        paths[family] = str(path)
    return paths


class TestESFTConformance(PeftCommonTester):
    transformers_class = AutoModelForCausalLM

    def prepare_inputs_for_testing(self):
        # as in peft's test_decoder_models.py
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
            config_kwargs = set_init_weights_false(ESFTConfig, config_kwargs)
        method = getattr(self, ALIASES.get(test, test))
        if test == "_test_passing_input_embeds_works":
            method("", checkpoints[family], ESFTConfig, config_kwargs, **kwargs)
        else:
            method(checkpoints[family], ESFTConfig, config_kwargs, **kwargs)
