"""After a training step, gradients and optimizer state exist for exactly the trained deltas (element counts)."""

import pytest
import torch
from peft import get_peft_model

from esft_peft import ESFTConfig, find_moe_layers
from esft_helpers import batch
from tiny_families import make_model


def numel_of(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def accounted(model, optimizer) -> tuple[int, int, int]:
    grads = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    states = [s for s in optimizer.state.values()]
    exp_avg = sum(s["exp_avg"].numel() for s in states)
    exp_avg_sq = sum(s["exp_avg_sq"].numel() for s in states)
    return grads, exp_avg, exp_avg_sq


@pytest.mark.parametrize("variant", ["experts", "shared", "non_expert"])
def test_gradients_and_optimizer_state_only_for_selected(variant):
    base = make_model("deepseek_v2")
    layers = find_moe_layers(base)
    experts = base.model.layers[1].mlp.experts
    per_expert = sum(p[0].numel() for p in experts.parameters())
    expected = 3 * per_expert  # layer 1: experts 0, 2, 5
    kwargs = {}
    if variant == "shared":
        kwargs["train_shared_experts"] = True
        expected += sum(numel_of(base.get_submodule(n)) for n in layers["1"].shared_names)
    if variant == "non_expert":
        kwargs["train_non_expert_modules"] = ["self_attn.q_proj", "input_layernorm"]
        layer_modules = [m for l in base.model.layers for m in (l.self_attn.q_proj, l.input_layernorm)]
        expected += sum(numel_of(m) for m in layer_modules)
    base_total = numel_of(base)
    model = get_peft_model(base, ESFTConfig(experts={1: [0, 2, 5]}, **kwargs))
    optimizer = step(model)
    grads, exp_avg, exp_avg_sq = accounted(model, optimizer)
    assert grads == exp_avg == exp_avg_sq == expected
    assert expected < 0.25 * base_total
    assert all(".esft_delta." in n for n, p in model.named_parameters() if p.grad is not None)


def saved_mib(model, ids) -> float:
    """MiB of tensors autograd keeps for backward over one training step (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values()) / 2**20


def test_whole_model_saves_for_backward_no_more_than_the_frozen_floor():
    """DeepSeek-V2-Lite-shaped (benchmarks/compare_methods.py's model), 6 of 64 experts per MoE layer. The floor
    freezes everything and back-propagates from the first MoE layer, where ESFT's backward stops too. Measured:
    floor 41.7 MiB, ESFT 32.4 MiB (0.78x); when the forward kept the selected experts' W + delta, 52.7 MiB (1.27x)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v2", vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=None,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, topk_method="greedy", n_group=1, topk_group=1,
    )
    ids = torch.randint(0, 2048, (4, 128), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    frozen = AutoModelForCausalLM.from_config(config).requires_grad_(False).train()
    leaf = lambda module, args, kwargs: ((args[0].detach().requires_grad_(),) + args[1:], kwargs)  # noqa: E731
    frozen.model.layers[1].register_forward_pre_hook(leaf, with_kwargs=True)
    floor = saved_mib(frozen, ids)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    experts = {key: list(range(0, 60, 10)) for key in find_moe_layers(base)}
    model = get_peft_model(base, ESFTConfig(experts=experts)).train()
    assert saved_mib(model, ids) <= 1.05 * floor
