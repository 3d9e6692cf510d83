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
