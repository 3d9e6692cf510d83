"""ESFT on a 4-bit (bitsandbytes nf4) base: the frozen fused experts held in 4-bit, the selected experts exact."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from esft_peft import ESFTConfig, find_moe_layers
from esft_peft.moe.layouts.base import unwrap
from esft_peft.tuners.esft.compute import with_delta
from esft_helpers import batch, delta_params, logits, reload_in_fresh_process, selection, train_steps
from quantized_helpers import (
    experts_bytes, first_store, force_groups, fused_weight_names, load_4bit, load_plain, store_weight,
    with_dequantized_experts,
)

FAMILY = "qwen3_moe"
GRAD_ATOL = 1e-6  # fp32: gradients through the 4-bit base against the dequantized reference


def adapted_4bit(family: str = FAMILY, **config_kwargs):
    base = load_4bit(family)
    return get_peft_model(base, ESFTConfig(experts=selection(base), **config_kwargs))


def reference_model(family: str = FAMILY, **quant):
    """The model a zero adapter on the 4-bit base must reproduce, with an ESFT adapter on its unquantized experts."""
    base = load_4bit(family)
    chosen = selection(base)
    with_dequantized_experts(base, chosen, **quant)
    return get_peft_model(base, ESFTConfig(experts=chosen, quantize_frozen_experts=False))


@pytest.fixture(params=["one call", "groups"])
def grouping(request, monkeypatch) -> str:
    """The tiny layers in one frozen call (their own size rule), or in groups of two experts (6 frozen: 3 groups)."""
    if request.param == "groups":
        force_groups(monkeypatch, 4)
    return request.param


def test_zero_adapter_equals_the_dequantized_base(grouping):
    model, reference = adapted_4bit(), reference_model()
    assert first_store(model) is not None and first_store(reference) is None
    assert len(first_store(model).groups) == (2 if grouping == "one call" else 4)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=0)


def test_routed_experts_hold_under_065_bytes_per_unselected_parameter():
    model = adapted_4bit()
    base = model.get_base_model()
    chosen = model.peft_config["default"].experts
    for key, layer in find_moe_layers(base).items():
        if key not in chosen:
            continue
        experts = unwrap(base.get_submodule(layer.experts_name))
        store = first_store(experts)
        per_expert = sum(torch.Size(experts.frozen_4bit.shapes[n][1:]).numel() for n in fused_weight_names(experts))
        unselected = (layer.num_experts - len(chosen[key])) * per_expert
        kept = store.nbytes() - store.nbytes(kept=False)
        assert kept == len(chosen[key]) * per_expert * 4  # the selected experts' W, fp32, unquantized
        held = experts_bytes(experts) - kept
        assert held / unselected <= 0.65, held / unselected
        assert experts_bytes(load_plain(FAMILY).get_submodule(layer.experts_name)) == kept + 4 * unselected


def _gradients(model, checkpointing: bool = False) -> dict[str, torch.Tensor]:
    model.train()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = batch(5)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: param.grad for name, param in delta_params(model).items()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_the_dequantized_reference(grouping, checkpointing):
    grads = _gradients(adapted_4bit(), checkpointing)
    expected = _gradients(reference_model(), checkpointing)
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected[name], atol=GRAD_ATOL, rtol=0)


def test_dequantized_experts_are_not_kept_for_backward(grouping):
    model = adapted_4bit()
    model.train()
    store = first_store(model)
    counts = {store.num_experts} | {len(ids) for ids in store.groups}  # a whole layer, a group, the selected experts
    whole = {(n, *s[1:]) for s in store.shapes.values() for n in counts}
    seen: list[tuple] = []

    def pack(tensor):
        seen.append(tuple(tensor.shape))
        return tensor

    ids = batch(5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    assert seen and not whole & set(seen)
    loss.backward()
    assert all(p.grad is not None for p in delta_params(model).values())


class FormedBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated while a 4-bit store forms rows (inside :meth:`forming`) that are still
    alive, checked after every op of the step; ``peak`` is their maximum. The storages of ``model``'s tensors (the
    packed 4-bit data, the kept rows, seen again through views) are not counted."""

    def __init__(self, model) -> None:
        super().__init__()
        tensors = list(model.parameters()) + list(model.buffers())
        self.held = {StorageWeakRef(t.untyped_storage()).cdata for t in tensors}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.inside = False
        self.peak = 0
        self.calls = {"forward": 0, "backward": 0}

    @contextmanager
    def forming(self):
        self.calls["forward" if torch.is_grad_enabled() else "backward"] += 1  # backward forms under no_grad
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        if self.inside:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes():
                    ref = StorageWeakRef(tensor.untyped_storage())
                    if ref.cdata not in self.held:
                        self.live.setdefault(ref.cdata, (ref, tensor.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


@pytest.mark.parametrize("groups, per_group", [(4, 2), (1, 6)])
def test_a_training_step_holds_one_group_of_dequantized_experts_at_a_time(monkeypatch, groups, per_group):
    """During a training step (forward, and backward, which dequantizes again) the dequantized expert weights alive
    at once are one group's (2 of a layer's 6 frozen experts), not the layer's: every allocation made while the store
    forms rows is tracked op by op until it is freed. With one group (``groups=1``, no grouping) the same measurement
    sees the whole layer's 6 frozen experts."""
    from esft_peft.tuners.esft.quantized import FrozenExperts4bit

    force_groups(monkeypatch, groups)
    model = adapted_4bit()
    model.train()
    store = first_store(model)
    assert [len(ids) for ids in store.groups[1:]] == [per_group] * (6 // per_group)
    per_expert = sum(torch.Size(shape[1:]).numel() for shape in store.shapes.values()) * 4  # fp32, every weight
    tracker = FormedBytes(model)
    group_rows = FrozenExperts4bit.group_rows

    def tracked(self, name, group):
        with tracker.forming():
            return group_rows(self, name, group)

    monkeypatch.setattr(FrozenExperts4bit, "group_rows", tracked)
    ids = batch(5)
    with tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    assert tracker.calls["forward"] and tracker.calls["backward"]
    assert tracker.peak == per_group * per_expert, (tracker.peak, per_expert)


def test_weights_formed_for_backward_are_freed_without_the_garbage_collector(monkeypatch):
    """What backward forms again (dequantized groups, selected ``W + delta``) is freed once the call's backward has
    run, by reference counting: no reference cycle keeps it until Python's cyclic garbage collector runs."""
    import gc

    from esft_peft.tuners.esft.compute.fused import FormedWeights

    force_groups(monkeypatch, 4)
    model = adapted_4bit()
    model.train()
    ids = batch(5)
    gc.collect()
    gc.disable()
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        assert not [o for o in gc.get_objects() if isinstance(o, FormedWeights)]
    finally:
        gc.enable()


def test_groups_without_pairs_are_not_dequantized(monkeypatch):
    """A call whose pairs all reach one group's experts dequantizes that group only (here a plain call of the
    experts module, as with adapters disabled), and computes what the dequantized experts compute."""
    from esft_peft.tuners.esft.quantized import FrozenExperts4bit, frozen_store

    force_groups(monkeypatch, 4)
    model, reference = adapted_4bit(), reference_model()
    name, experts = next((n, m) for n, m in model.named_modules() if frozen_store(m) is not None)
    store = frozen_store(experts)
    formed: list[int] = []
    group_rows = FrozenExperts4bit.group_rows
    monkeypatch.setattr(FrozenExperts4bit, "group_rows", lambda self, n, g: formed.append(g) or group_rows(self, n, g))
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    routed = torch.tensor(store.groups[2]).repeat(6, 1)  # both slots of every token to the experts of group 2
    weights = torch.rand(6, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = experts(hidden, routed, weights)
        expected = reference.get_submodule(name)(hidden, routed, weights)
    assert set(formed) == {2}
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_groups_run_through_the_configured_experts_implementation(monkeypatch, implementation):
    """Every group's call is a call of the experts module (hooks included) through the implementation set with
    ``set_experts_implementation``, with that group's experts only; forward and gradients equal the dequantized
    reference's under each implementation."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    force_groups(monkeypatch, 3)  # groups of 3 of the 6 frozen experts; the selected call has 2
    dispatched: list[int] = []
    if implementation != "eager":
        function = ALL_EXPERTS_FUNCTIONS[implementation]
        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, implementation,
                            lambda self, *a, **kw: dispatched.append(self.num_experts) or function(self, *a, **kw))
    model, reference = adapted_4bit(), reference_model()
    for each in (model, reference):
        each.get_base_model().set_experts_implementation(implementation)
    called: list[int] = []
    for module in model.modules():
        if type(module).__name__ == "FrozenExperts4bit":
            continue
        if any(type(child).__name__ == "FrozenExperts4bit" for child in module.children()):
            module.register_forward_pre_hook(lambda module, args: called.append(module.num_experts))
    out = logits(model)
    assert set(called) == {2, 3}
    assert implementation == "eager" or sorted(dispatched) == sorted(called)
    torch.testing.assert_close(out, logits(reference), atol=1e-6, rtol=0)
    grads, expected = _gradients(model), _gradients(reference)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=GRAD_ATOL, rtol=0)


def test_training_changes_only_the_selected_experts():
    model = adapted_4bit()
    before = logits(model)
    store = first_store(model)
    kept = {n: getattr(store, f"kept_{n}").clone() for n in store.shapes}
    train_steps(model)
    assert not torch.allclose(logits(model), before)
    assert all(torch.equal(getattr(store, f"kept_{n}"), kept[n]) for n in store.shapes)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".esft_delta." not in n)


def test_save_reload_in_a_fresh_process(tmp_path):
    model = adapted_4bit()
    train_steps(model)
    model.save_pretrained(tmp_path)
    torch.save(logits(model), tmp_path / "expected.pt")
    assert reload_in_fresh_process("quantized_helpers:load_4bit", {"q": (FAMILY, None, str(tmp_path))}) == {"q": True}


def test_adapter_merges_into_the_unquantized_base(tmp_path):
    model = adapted_4bit()
    train_steps(model)
    model.save_pretrained(tmp_path)
    saved = {n.replace(".esft_delta.default.", ".esft_delta."): p.detach() for n, p in delta_params(model).items()}
    plain = load_plain(FAMILY)
    original = {k: v.clone() for k, v in plain.state_dict().items()}
    merged = PeftModel.from_pretrained(plain, tmp_path).merge_and_unload()
    state = merged.state_dict()
    assert state.keys() == original.keys()
    layers = find_moe_layers(merged)
    changed = set()
    for key, ids in model.peft_config["default"].experts.items():
        experts_name = layers[key].experts_name
        for name in fused_weight_names(merged.get_submodule(experts_name)):
            full = f"{experts_name}.{name}"
            delta = saved[f"base_model.model.{experts_name}.esft_delta.{name}"]
            rows = state[full][torch.tensor(ids)]
            assert torch.equal(rows, with_delta(original[full][torch.tensor(ids)], delta))
            others = [e for e in range(layers[key].num_experts) if e not in ids]
            assert torch.equal(state[full][others], original[full][others])
            changed.add(full)
    assert all(torch.equal(state[k], original[k]) for k in original if k not in changed)


def test_merge_on_the_4bit_base_is_refused():
    model = adapted_4bit()
    train_steps(model)
    before = logits(model)
    with pytest.raises(ValueError, match="Cannot merge an ESFT adapter on a 4-bit base.*load the base unquantized"):
        model.merge_and_unload()
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_unload_leaves_a_working_4bit_model(grouping):
    model, reference = adapted_4bit(), reference_model()
    expected = logits(reference)
    base = model.unload()
    torch.testing.assert_close(logits(base), expected, atol=1e-6, rtol=0)


def test_a_second_adapter_selects_among_the_kept_experts():
    model = adapted_4bit()
    chosen = model.peft_config["default"].experts
    key, ids = next(iter(chosen.items()))
    model.add_adapter("same", ESFTConfig(experts={key: ids[:1]}, init_weights=False))
    model.set_adapter("same")
    assert not torch.allclose(logits(model), logits(reference_model()))
    other = next(e for e in range(8) if e not in ids)
    before = logits(model)
    with pytest.raises(ValueError, match=rf"experts \[{other}\] are held in 4-bit.*Select among"):
        model.add_adapter("other", ESFTConfig(experts={key: [other]}))
    assert "other" not in model.peft_config
    assert torch.equal(logits(model), before)


def test_switched_off_keeps_the_experts_as_loaded():
    model = adapted_4bit(quantize_frozen_experts=False)
    assert first_store(model) is None
    base = load_4bit(FAMILY)
    assert torch.equal(logits(model), logits(base))


def test_double_quant_and_fp4_follow_the_base_settings(grouping):
    base = load_4bit(FAMILY, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="fp4")
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    store = first_store(model)
    assert store.settings.double_quant and store.settings.quant_type == "fp4"
    reference = load_4bit(FAMILY, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="fp4")
    with_dequantized_experts(reference, selection(reference), quant_type="fp4", double_quant=True)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=0)
    single = first_store(adapted_4bit())
    assert store.nbytes(kept=False) < single.nbytes(kept=False)


def test_fp16_compute_dtype_leaves_the_deltas_in_the_experts_dtype():
    """Documented: bnb_4bit_compute_dtype is the Linear4bit layers'; the experts dequantize to their own dtype,
    which the deltas and the kept rows share."""
    base = load_4bit(FAMILY, bnb_4bit_compute_dtype=torch.float16)
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    store = first_store(model)
    assert store.settings.compute_dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in delta_params(model).values())
    assert all(getattr(store, f"kept_{n}").dtype == torch.float32 for n in store.shapes)
    assert store.group_rows(store.names[0], 1).dtype == torch.float32
    train_steps(model)
    assert all(torch.isfinite(p).all() for p in delta_params(model).values())


def test_8bit_base_is_refused_unless_switched_off():
    from quantized_helpers import saved_base
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        saved_base(FAMILY), quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32
    )
    with pytest.raises(ValueError, match="loaded in 8-bit.*quantize_frozen_experts=False"):
        get_peft_model(base, ESFTConfig(experts=selection(base)))
    model = get_peft_model(base, ESFTConfig(experts=selection(base), quantize_frozen_experts=False))
    assert first_store(model) is None and delta_params(model)


def test_fp8_experts_are_refused():
    from tiny_families import make_model

    base = make_model(FAMILY)
    for layer in find_moe_layers(base).values():
        experts = base.get_submodule(layer.experts_name)
        for name in fused_weight_names(experts):
            setattr(experts, name, torch.nn.Parameter(getattr(experts, name).to(torch.float8_e4m3fn),
                                                      requires_grad=False))
    with pytest.raises(ValueError, match="already quantized.*FP8/MXFP4 experts need a GPU"):
        get_peft_model(base, ESFTConfig(experts=selection(base)))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("shape, kept", [((8, 32, 32), [0, 7]), ((8, 32, 32), [3]), ((5, 3, 7), [1]), ((6, 16, 40), [2, 4])])
def test_store_dequantizes_like_the_reference(monkeypatch, groups, shape, kept):
    """Each group's rows equal a plain-torch dequantization of bitsandbytes' packed values of the whole tensor, also
    where an expert's values start or end inside a block (bitsandbytes' CPU kernel misreads tensors whose last
    dimension is not a multiple of the blocksize, which the store avoids)."""
    import bitsandbytes.functional as bnb
    from esft_peft.tuners.esft.quantized import FourBitSettings, FrozenExperts4bit
    from quantized_helpers import reference_dequantize

    force_groups(monkeypatch, groups)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    store = FrozenExperts4bit({"w": weight}, kept, FourBitSettings(quant_type="nf4", blocksize=64))
    frozen = [e for e in range(shape[0]) if e not in kept]
    assert store.groups[0] == kept and sum(store.groups[1:], []) == frozen
    size = -(-shape[0] // groups)  # about 1/groups of the layer's experts
    assert len(store.groups) - 1 == -(-len(frozen) // size) and all(len(ids) <= size for ids in store.groups[1:])
    packed, state = bnb.quantize_4bit(weight[frozen].contiguous(), blocksize=64, quant_type="nf4")
    expected = weight.clone()
    expected[frozen] = reference_dequantize(packed, state)
    for group, ids in enumerate(store.groups):
        assert torch.equal(store.group_rows("w", group), expected[ids])
    assert torch.equal(store.rows("w", kept[::-1]), weight[kept[::-1]])


def test_group_size_rule():
    """About 1/8 of a layer's experts per group, but at least 1 MiB of weights per group: DeepSeek-V2-Lite's layers
    (64 experts of 17 MB in bf16) in 8 groups of 8, Mixtral's (8 experts of 352 MB) one expert per group, a layer of
    small experts (this file's tiny models) in one call."""
    from esft_peft.tuners.esft.quantized import _group_size

    assert _group_size(64, 3 * 2048 * 1408 * 2) == 8
    assert _group_size(8, 3 * 4096 * 14336 * 2) == 1
    assert _group_size(8, 3 * 32 * 16 * 4) >= 8
    assert _group_size(64, 3 * 256 * 128 * 2) == 8  # benchmarks/quantized_memory.py's default shape


@pytest.mark.parametrize("double_quant", [False, True])
def test_store_follows_its_buffers_when_moved(monkeypatch, double_quant):
    """``.to(device)`` replaces the buffers; the quant state is rebuilt from them (here: moved by a copy)."""
    from esft_peft.tuners.esft.quantized import FourBitSettings, FrozenExperts4bit

    force_groups(monkeypatch, 3)
    weight = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(1))
    store = FrozenExperts4bit({"w": weight}, [2], FourBitSettings(double_quant=double_quant))
    before = store_weight(store, "w")
    store._apply(lambda t: t.clone())
    assert store._states["w"].absmax is not store.absmax_w
    assert torch.equal(store_weight(store, "w"), before)
    assert store._states["w"].absmax is store.absmax_w


def test_double_quant_groups_equal_bitsandbytes_whole_dequantization(monkeypatch):
    """With double quantization a group's block scales are dequantized from only the nested blocks holding them (a
    group's scales start inside a nested block here); the rows equal bitsandbytes' dequantization of the whole."""
    import bitsandbytes.functional as bnb
    from esft_peft.tuners.esft.quantized import FourBitSettings, FrozenExperts4bit

    force_groups(monkeypatch, 5)
    weight = torch.randn(10, 96, 64, generator=torch.Generator().manual_seed(2))  # 96 scales per expert
    store = FrozenExperts4bit({"w": weight}, [4], FourBitSettings(double_quant=True))
    frozen = [e for e in range(10) if e != 4]
    packed, state = bnb.quantize_4bit(weight[frozen].contiguous(), blocksize=64, compress_statistics=True,
                                      quant_type="nf4")
    whole = bnb.dequantize_4bit(packed, state)
    assert len(store.groups) > 3
    for group, ids in enumerate(store.groups[1:], start=1):
        positions = [frozen.index(e) for e in ids]
        assert torch.equal(store.group_rows("w", group), whole[positions])


def test_mixed_adapter_batch_on_the_4bit_base(grouping):
    model = adapted_4bit(init_weights=False)
    key, ids = next(iter(model.peft_config["default"].experts.items()))
    model.add_adapter("other", ESFTConfig(experts={key: ids[::-1]}, init_weights=False))
    model.eval()
    inputs = batch(9, (3, 16))
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=inputs, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=inputs[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=inputs[row : row + 1]).logits
            torch.testing.assert_close(mixed[row], alone[0], atol=1e-6, rtol=0)


def _factor_gradients(model) -> dict[str, torch.Tensor]:
    model.train()
    ids = batch(5)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: param.grad for name, param in model.named_parameters() if ".esft_lora_" in name}


def test_low_rank_deltas_on_the_4bit_base_equal_the_dequantized_reference(grouping):
    """Low-rank deltas (delta_rank) train on the kept original rows exactly as on the dequantized base."""
    base = load_4bit(FAMILY)
    torch.manual_seed(0)  # the same random factors in both models
    model = get_peft_model(base, ESFTConfig(experts=selection(base), delta_rank=4, init_weights=False))
    base = load_4bit(FAMILY)
    chosen = selection(base)
    with_dequantized_experts(base, chosen)
    torch.manual_seed(0)
    reference = get_peft_model(base, ESFTConfig(experts=chosen, quantize_frozen_experts=False, delta_rank=4,
                                                init_weights=False))
    assert first_store(model) is not None
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=0)
    grads, expected = _factor_gradients(model), _factor_gradients(reference)
    assert grads.keys() == expected.keys() and any(".esft_lora_B." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=GRAD_ATOL, rtol=0)
