"""PESC: the load-balancing loss, validation and bad input, the grouped-matmul paths, the official checkpoint
import, scoring/comparison of a crafted model, and training on a bitsandbytes 4-bit base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

import esft_peft.tuners.pesc.layer as pesc_layer
from esft_peft import (
    PESCConfig,
    compare_tasks,
    load_balancing_loss,
    load_official_pesc,
    router_aux_loss,
    score_experts,
)
from esft_peft.files import CorruptAdapterError
from esft_peft.moe.errors import UnsupportedLayoutError
from esft_peft.tuners.pesc.targets import NoDenseMLPError
from esft_helpers import batch, logits, train_steps
from pesc_helpers import crafted, pesc_layers, reference_layer
from tiny_dense import make_dense_model
from tiny_families import make_model


def _plain_cross_entropy(model, ids):
    out = model(input_ids=ids).logits
    return F.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _expected_aux(model, ids, alpha, mask=None):
    """An independent computation: routers' logits through hooks, f from the top-k decisions, P from the softmax."""
    captured = []
    handles = [layer.pesc_router["default"].register_forward_hook(lambda m, a, out: captured.append(out))
               for layer in pesc_layers(model).values()]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    keep = torch.ones(ids.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    terms = []
    for logits_, _, index in captured:
        logits_, index = logits_[keep], index[keep]
        experts = logits_.shape[-1]
        f = torch.bincount(index.reshape(-1), minlength=experts).double() / index.numel()
        p = torch.softmax(logits_.double(), -1).mean(0)
        terms.append(experts * (f * p).sum())
    return alpha * torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------------- loss


def test_loss_is_cross_entropy_plus_the_papers_aux_loss():
    model, _ = crafted("llama", lora=False, router_aux_loss_coef=0.1)
    train_steps(model)
    model.eval()
    ids = batch(5)
    with torch.no_grad():
        total = model(input_ids=ids, labels=ids).loss
        aux = router_aux_loss(model)
        plain = _plain_cross_entropy(model, ids)
    torch.testing.assert_close(aux.double(), _expected_aux(model, ids, 0.1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total, plain + aux, atol=1e-6, rtol=0)
    assert aux > 0.1 * 0.99  # E * sum f P >= 1 - small: a balanced router gives exactly alpha


def test_coefficient_zero_gives_plain_cross_entropy():
    model, _ = crafted("llama", lora=False, router_aux_loss_coef=0.0)
    train_steps(model)
    ids = batch(6)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.equal(loss, model.get_base_model().loss_function(
            logits=model(input_ids=ids).logits, labels=ids, vocab_size=96))
    assert router_aux_loss(model) is None


def test_aux_loss_has_a_gradient_on_the_routers():
    model, _ = crafted("qwen3", lora=False, router_aux_loss_coef=0.01)
    model.train()
    ids = batch(7)
    model(input_ids=ids)
    router_aux_loss(model).backward()
    for layer in pesc_layers(model).values():
        grad = layer.pesc_router["default"].weight.grad
        assert grad is not None and grad.abs().sum() > 0
        down = layer.pesc_down["default"].grad
        assert down is None or not down.any()  # only the routers feel the balance loss


def test_official_codes_constant_is_not_what_we_compute():
    """The authors' copy took the softmax over the top-k logits only: P_i == 1/k, no gradient. Ours differs."""
    logits_ = torch.randn(20, 4, requires_grad=True)
    index = logits_.topk(2, dim=-1).indices
    ours = load_balancing_loss(logits_, index)
    ours.backward()
    assert logits_.grad.abs().sum() > 0
    uniform = load_balancing_loss(torch.zeros(20, 4), torch.tensor([[0, 1], [2, 3]] * 10))
    assert uniform.item() == pytest.approx(1.0)


def test_attention_mask_leaves_padding_out():
    model, _ = crafted("llama", lora=False, router_aux_loss_coef=0.5)
    train_steps(model)
    model.eval()
    ids = batch(8)
    mask = torch.ones_like(ids)
    mask[:, -5:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        masked = router_aux_loss(model, attention_mask=mask)
    torch.testing.assert_close(masked.double(), _expected_aux(model, ids, 0.5, mask), atol=1e-6, rtol=1e-6)


def test_reentrant_checkpointing_warns_that_routers_get_no_balance_gradient(caplog):
    model, _ = crafted("llama", lora=False)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = batch(9)
    with caplog.at_level("WARNING"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert "use_reentrant" in caplog.text


# ---------------------------------------------------------------------------------------------------- layer


@pytest.mark.parametrize("adapter_dim", [8, 6])  # 6: float32 rows of 24 bytes take the per-expert fallback
def test_grouped_paths_match_the_formula(adapter_dim):
    model, _ = crafted("llama", lora=False, adapter_dim=adapter_dim, num_experts=5, top_k=3)
    train_steps(model)
    model.eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        for layer in pesc_layers(model).values():
            torch.testing.assert_close(layer(x), reference_layer(layer, x), atol=1e-5, rtol=1e-5)


def test_unaligned_weights_use_the_same_kernel():
    model, _ = crafted("llama", lora=False)
    train_steps(model)
    model.eval()
    expected = logits(model)
    for layer in pesc_layers(model).values():  # move the adapter experts to storage starting 4 bytes off alignment
        for name in ("pesc_down", "pesc_up"):
            param = getattr(layer, name)["default"]
            storage = torch.empty(param.numel() + 1)[1:].view(param.shape)
            storage.copy_(param)
            getattr(layer, name)["default"] = torch.nn.Parameter(storage)
    assert torch.equal(logits(model), expected)


def test_missing_grouped_matmul_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(pesc_layer, "_grouped_mm", None)
    with pytest.raises(UnsupportedLayoutError, match="_grouped_mm"):
        get_peft_model(make_dense_model("llama"), PESCConfig())


def test_layers_to_transform_and_target_modules():
    model = get_peft_model(make_dense_model("llama", num_hidden_layers=3), PESCConfig(layers_to_transform=[0, 2]))
    assert sorted(pesc_layers(model)) == ["base_model.model.model.layers.0.mlp", "base_model.model.model.layers.2.mlp"]
    model = get_peft_model(make_dense_model("llama"), PESCConfig(target_modules=["layers.1.mlp"], lora_r=2,
                                                                  lora_target_modules=["q_proj", "down_proj"]))
    assert list(pesc_layers(model)) == ["base_model.model.model.layers.1.mlp"]
    lora = sorted(n.split(".pesc_lora_A")[0] for n, _ in model.named_parameters() if ".pesc_lora_A." in n)
    assert lora == [f"base_model.model.model.layers.{i}.{m}" for i, m in
                    ((0, "mlp.down_proj"), (0, "self_attn.q_proj"), (1, "mlp.base_layer.down_proj"),
                     (1, "self_attn.q_proj"))]


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_experts=4, top_k=5), "top_k.*between 1 and `num_experts`"),
        (dict(adapter_dim=0), "adapter_dim` must be >= 1"),
        (dict(num_experts=0), "num_experts` must be >= 1"),
        (dict(adapter_dropout=1.0), "adapter_dropout"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"),
        (dict(lora_target_modules=["q_proj"]), "lora_r` is 0"),
        (dict(layers_to_transform=[-1]), "layers_to_transform"),
    ],
)
def test_invalid_configs_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PESCConfig(**kwargs)


def test_model_without_decoder_mlps_is_refused():
    model = make_dense_model("llama")
    for layer in model.model.layers:
        del layer.mlp
    with pytest.raises(NoDenseMLPError, match="no decoder-layer MLP"):
        get_peft_model(model, PESCConfig())
    with pytest.raises(NoDenseMLPError, match="matched no module"):
        get_peft_model(make_dense_model("llama"), PESCConfig(target_modules=["feed_forward"]))


def test_already_moe_layers_and_non_mlps_are_refused():
    moe = make_model("deepseek_v2")  # layer 0 dense, layers 1-2 MoE
    with pytest.raises(ValueError, match=r"Layer 1's MLP .* is already a mixture of experts.*layers_to_transform=\[0\]"):
        get_peft_model(moe, PESCConfig())
    assert not pesc_layers(moe)
    crafted_dense = get_peft_model(make_model("deepseek_v2"), PESCConfig(layers_to_transform=[0]))
    assert list(pesc_layers(crafted_dense)) == ["base_model.model.model.layers.0.mlp"]
    with pytest.raises(ValueError, match="not an MLP"):
        get_peft_model(make_dense_model("llama"), PESCConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="have no MLP to upcycle"):
        get_peft_model(make_dense_model("llama"), PESCConfig(layers_to_transform=[5]))


def test_adapter_for_another_base_is_refused_before_anything_is_touched(tmp_path):
    model, _ = crafted("llama")
    model.save_pretrained(tmp_path)
    other = make_dense_model("llama", intermediate_size=64)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="belongs to another base model; no weights were loaded"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not pesc_layers(other) and all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    with pytest.raises(ValueError, match="created for a 'llama' model, but the base model is 'qwen2'"):
        PeftModel.from_pretrained(make_dense_model("qwen2"), tmp_path)


def test_wrong_expert_count_and_corrupt_files_are_refused(tmp_path):
    model, _ = crafted("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_experts": 8}))
    base = make_dense_model("llama")
    with pytest.raises(ValueError, match=r"has shape \[4, 8, 32\], but num_experts=8"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not pesc_layers(base)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CorruptAdapterError, match="corrupt or truncated"):
        PeftModel.from_pretrained(make_dense_model("llama"), tmp_path)


def test_esft_cannot_wrap_pesc_experts_and_scoring_needs_one_active_adapter():
    from esft_peft import ESFTConfig, find_moe_layers

    model, _ = crafted("llama", lora=False)
    with pytest.raises(UnsupportedLayoutError, match="PESC adapter experts"):
        get_peft_model(model.get_base_model(), ESFTConfig(experts={0: [1]}))
    model.add_adapter("other", PESCConfig(num_experts=2, top_k=1, adapter_dim=4))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(UnsupportedLayoutError, match="2 PESC adapters are active"):
        find_moe_layers(model)


# ---------------------------------------------------------------------------------------------------- scoring


def test_compare_tasks_on_a_crafted_model_shows_which_expert_serves_which_task(tmp_path):
    from esft_peft import plot_scores

    model, _ = crafted("llama", lora=False, num_experts=8, top_k=2)
    train_steps(model)
    low = [{"input_ids": (batch(s, (1, 16))[0] % 48).tolist()} for s in range(4)]
    high = [{"input_ids": (batch(s, (1, 16))[0] % 48 + 48).tolist()} for s in range(4)]
    scores = {task: score_experts(model, data, token_budget=None, show_progress=False)
              for task, data in (("low", low), ("high", high))}
    for task_scores in scores.values():
        assert all(sum(row) == 4 * 16 * 2 for row in task_scores.expert_counts.values())
    comparison = compare_tasks(scores["low"], scores["high"], labels=("low", "high"))
    assert comparison.labels == ("low", "high")
    plot_scores(scores["low"], path=tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------------- official


def _official_state(model_family: str = "llama", experts: int = 4, dim: int = 8, prefix: str = "base_model.model."):
    generator = torch.Generator().manual_seed(5)
    state = {}
    for layer in range(2):
        root = f"{prefix}model.layers.{layer}.mlp.moe_adapter"
        state[f"{root}.router.weight"] = torch.randn(experts, 32, generator=generator)
        for j in range(experts):
            state[f"{root}.experts.expert_{j}.adapter_down.weight"] = torch.randn(dim, 32, generator=generator) * 0.1
            state[f"{root}.experts.expert_{j}.adapter_up.weight"] = torch.randn(32, dim, generator=generator) * 0.1
    return state


def _official_forward(state, layer_index, mlp, x, top_k, scaling):
    """The authors' layer: softmax after top-k, then each expert over its routed tokens (a masked loop)."""
    root = f"base_model.model.model.layers.{layer_index}.mlp.moe_adapter"
    flat = x.reshape(-1, x.shape[-1])
    h = mlp(flat)
    kept, chosen = (flat @ state[f"{root}.router.weight"].T).topk(top_k, dim=-1)
    weights = torch.softmax(kept, dim=-1)
    out = h.clone()
    for j in range(state[f"{root}.router.weight"].shape[0]):
        rows, slots = torch.where(chosen == j)
        down = state[f"{root}.experts.expert_{j}.adapter_down.weight"]
        up = state[f"{root}.experts.expert_{j}.adapter_up.weight"]
        out[rows] += weights[rows, slots, None] * scaling * (F.gelu(h[rows] @ down.T) @ up.T)
    return out.view_as(x)


def test_official_checkpoint_import_from_pickle_and_safetensors(tmp_path):
    state = _official_state()
    torch.save(state, tmp_path / "moe_model.bin")
    save_file(state, str(tmp_path / "moe_model.safetensors"))
    results = []
    for name in ("moe_model.bin", "moe_model.safetensors"):
        model = load_official_pesc(tmp_path / name, make_dense_model("llama"), top_k=2, adapter_scaling=0.25)
        config = model.peft_config["default"]
        assert (config.num_experts, config.adapter_dim, config.top_k, config.adapter_scaling) == (4, 8, 2, 0.25)
        model.eval()
        x = torch.randn(2, 5, 32)
        with torch.no_grad():
            for index, layer in enumerate(pesc_layers(model).values()):
                expected = _official_forward(state, index, layer.get_base_layer(), x, 2, 0.25)
                torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        results.append(logits(model))
    assert torch.equal(results[0], results[1])


def test_official_import_refuses_pickled_code_and_incomplete_or_mismatched_files(tmp_path):
    torch.save({"weights": torch.zeros(1), "code": CorruptAdapterError}, tmp_path / "evil.bin")
    with pytest.raises(CorruptAdapterError, match="weights_only=True"):
        load_official_pesc(tmp_path / "evil.bin", make_dense_model("llama"))
    state = _official_state()
    del state["base_model.model.model.layers.1.mlp.moe_adapter.experts.expert_2.adapter_up.weight"]
    save_file(state, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(ValueError, match=r"Layer 1: the router has 4 experts but adapter_up weights exist for"):
        load_official_pesc(tmp_path / "incomplete.safetensors", make_dense_model("llama"))
    save_file(_official_state(), str(tmp_path / "ok.safetensors"))
    base = make_dense_model("llama", hidden_size=64, head_dim=16)
    with pytest.raises(ValueError, match="belongs to another base model"):
        load_official_pesc(tmp_path / "ok.safetensors", base)
    assert not pesc_layers(base)
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="No PESC weights in the official layout"):
        load_official_pesc(tmp_path / "other.safetensors", make_dense_model("llama"))


# ---------------------------------------------------------------------------------------------------- QLoRA


def test_qlora_recipe_on_a_4bit_base_trains_saves_and_reloads(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes quantises in blocks of 64 values: dimensions of 64 and 128
    make_dense_model("llama", hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)

    def quantized():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization).eval()

    config = PESCConfig(num_experts=4, top_k=2, adapter_dim=8, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        adapter_dropout=0.0)
    kept = get_peft_model(quantized(), config, autocast_adapter_dtype=False)
    layer = next(iter(pesc_layers(kept).values()))
    assert layer.pesc_down["default"].dtype == torch.bfloat16  # the compute dtype, never quantised
    model = get_peft_model(quantized(), PESCConfig(**config.to_dict() | {"peft_type": None, "base_shapes": None,
                                                                         "base_model_type": None}))
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(lora_layers) == 2 * 7  # q, k, v, o, gate, up, down in both layers: peft's bnb LoRA layers
    layer = next(iter(pesc_layers(model).values()))
    assert layer.pesc_router["default"].weight.dtype == torch.float32  # peft's fp32 master weights
    assert all(p.dtype in (torch.float32, torch.bfloat16) for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, steps=3)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("pesc_up" in n for n in changed) and any(".pesc_lora_B." in n for n in changed)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantized(), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), expected)
