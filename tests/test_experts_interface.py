"""ESFT computes fused experts through transformers' experts interface: the implementation the user set
(``set_experts_implementation``, including one registered later) is the function that runs, for frozen and selected
pairs alike; the selected pairs with ``W + delta``, formed again in backward instead of kept."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, grouped_mm_experts_forward

from esft_peft import ESFTConfig
from esft_helpers import batch, delta_params, logits, selection, train_steps
from tiny_families import make_model


@pytest.fixture
def spy():
    """An experts implementation registered in transformers' interface, recording each call."""
    calls: list[tuple[int, int]] = []  # (num_experts the module had, pairs in the call)

    def spy_forward(self, hidden_states, top_k_index, top_k_weights):
        calls.append((self.num_experts, top_k_index.numel()))
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    ExpertsInterface.register("esft_test_spy", spy_forward)
    yield calls
    del ExpertsInterface._global_mapping["esft_test_spy"]


def test_a_registered_implementation_computes_frozen_and_selected_pairs(spy):
    base = make_model("qwen3_moe")
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts={"0": [1, 6], "1": [3]}))
    model.get_base_model().set_experts_implementation("esft_test_spy")
    out = logits(model)
    assert torch.equal(out, reference)  # the spy computes as grouped_mm does: a zero adapter is exact
    tokens, top_k = batch().numel(), 2
    assert {experts for experts, _ in spy} == {8, 2, 1}  # frozen calls see 8 experts, selected calls 2 and 1
    per_layer = [spy[:2], spy[2:]]
    assert all(sum(pairs for _, pairs in calls) == tokens * top_k for calls in per_layer)  # every pair once


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_the_configured_builtin_implementation_runs(implementation, monkeypatch):
    calls = []
    original = ALL_EXPERTS_FUNCTIONS[implementation]

    def counting(self, *args, **kwargs):
        calls.append(implementation)
        return original(self, *args, **kwargs)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, implementation, counting)  # the instance the decorator dispatches on
    base = make_model("deepseek_v2")
    base.set_experts_implementation(implementation)
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    train_steps(model, steps=1)
    assert len(calls) >= 4  # two MoE layers, a frozen and a selected call each
    calls.clear()
    with model.disable_adapter():
        logits(model)
    assert len(calls) == 2  # disabled: the base module, one call per layer


def test_eager_runs_the_familys_own_forward():
    base = make_model("mixtral")
    base.set_experts_implementation("eager")
    reference = logits(base)
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    experts = model.get_base_model().model.layers[0].mlp.experts.get_base_layer()
    calls = []
    experts.register_forward_pre_hook(lambda module, args: calls.append(module.num_experts))
    torch.testing.assert_close(logits(model), reference, atol=1e-6, rtol=0)
    assert sorted(calls) == [2, 8]  # the module was called (hooks ran) for selected and frozen pairs


def test_selected_weights_are_formed_again_in_backward_and_outer_hooks_still_see_activations():
    base = make_model("qwen3_moe", hidden_size=64, moe_intermediate_size=64, num_experts=16, num_hidden_layers=1)
    model = get_peft_model(base, ESFTConfig(experts={"0": [2, 9]}))
    wrapped = model.get_base_model().model.layers[0].mlp.experts
    hidden = torch.randn(64, 64, requires_grad=True)
    index = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:4] for i in range(64)])
    index[:, 0] = 2  # every token reaches selected expert 2
    weights = torch.rand(64, 4).softmax(-1)
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = wrapped(hidden, index, weights)
    assert (2, 128, 64) not in shapes and (2, 64, 64) not in shapes  # W + delta of the two selected experts
    selected_pairs = int(torch.isin(index, torch.tensor([2, 9])).sum())
    assert (selected_pairs, 64) in shapes  # the selected call's activations reach the outer hooks
    out.square().sum().backward()
    deltas = wrapped.esft_delta["default"]
    grads = {name: delta.grad.clone() for name, delta in deltas.items()}

    # The same gradients as autograd computes when it keeps W + delta (no saved-tensor hooks involved).
    for delta in deltas.values():
        delta.grad = None
    experts = wrapped.get_base_layer()
    kept = {name: (getattr(experts, name)[[2, 9]] + deltas[name]) for name in deltas}
    replaced = {name: getattr(experts, name).detach().clone() for name in deltas}
    for name in deltas:
        replaced[name][[2, 9]] = kept[name]
    torch.func.functional_call(experts, replaced, (hidden, index, weights)).square().sum().backward()
    for name, delta in deltas.items():
        torch.testing.assert_close(grads[name], delta.grad, atol=1e-6, rtol=1e-5)


def test_no_pair_on_a_selected_expert_gives_zero_gradients():
    base = make_model("qwen3_moe", num_hidden_layers=1)
    model = get_peft_model(base, ESFTConfig(experts={"0": [5]}))
    wrapped = model.get_base_model().model.layers[0].mlp.experts
    hidden = torch.randn(8, 32)
    index = torch.tensor([[0, 1]] * 8)
    out = wrapped(hidden, index, torch.full((8, 2), 0.5))
    out.sum().backward()
    assert all(torch.equal(d.grad, torch.zeros_like(d)) for d in delta_params(model).values())
