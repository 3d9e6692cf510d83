"""The wiring of peft's generic method tests (``PeftCommonTester``) shared by ESFT's and PESC's conformance runs.

As peft's tests/test_decoder_models.py wires them (its per-test preparation, e.g. ``set_init_weights_false``, is
repeated here), plus the generic tests that peft wires in tests/test_custom_models.py. Each method's test file gives
its families, config variants and the tests that do not apply to it, with the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import pytest
import torch

from .testing_common import PeftCommonTester
from .testing_utils import set_init_weights_false

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

# Not applicable to either method, by design: esft-peft never loads pickle.
PICKLE_TESTS = {
    "_test_save_pretrained_pickle": "by design: esft-peft never loads pickle (torch.load only with weights_only), "
    "so an adapter saved with safe_serialization=False cannot be loaded back",
    "_test_save_pretrained_selected_adapters_pickle": "by design: esft-peft never loads pickle (see "
    "_test_save_pretrained_pickle)",
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


def save_checkpoints(tmp_path_factory: Any, families: Iterable[str], make: Callable[..., Any]) -> dict[str, str]:
    """family -> directory of a saved tiny checkpoint (the ``model_id`` peft's tests load with from_pretrained)."""
    paths = {}
    for family in families:
        path = tmp_path_factory.mktemp(family)
        make(family, num_hidden_layers=3).save_pretrained(path)
        paths[family] = str(path)
    return paths


class MethodConformance(PeftCommonTester):
    """peft's common tester for one method; :meth:`run_generic` runs one generic test as peft wires it."""

    transformers_class = None  # set by subclasses

    def prepare_inputs_for_testing(self) -> dict[str, torch.Tensor]:
        # as in peft's test_decoder_models.py
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def run_generic(self, test: str, model_id: str, config_cls: type, config_kwargs: dict, not_applicable: dict,
                    refused: tuple[set[str], str] = (set(), "")) -> None:
        """Run ``test``; skip it with its reason when ``not_applicable``; for a test in ``refused[0]``, expect the
        method's clear ValueError (matching ``refused[1]``) instead of peft's expectation."""
        if test in not_applicable:
            pytest.skip(not_applicable[test])
        kwargs, init_weights_false = GENERIC_TESTS[test]
        config_kwargs = dict(config_kwargs)
        if init_weights_false:
            config_kwargs = set_init_weights_false(config_cls, config_kwargs)
        method = getattr(self, ALIASES.get(test, test))
        args = ("", model_id) if test == "_test_passing_input_embeds_works" else (model_id,)
        if test in refused[0]:
            with pytest.raises(ValueError, match=refused[1]):
                method(*args, config_cls, config_kwargs, **kwargs)
            return
        method(*args, config_cls, config_kwargs, **kwargs)
