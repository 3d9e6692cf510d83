"""Weight decay: esft-peft's default decays the deltas (toward the base); the authors' decays W + delta to zero."""

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer

from esft_peft import ESFTConfig
from esft_peft.training import ExpertWeightDecayCallback, decay_expert_weights, esft_training_arguments
from esft_helpers import batch
from tiny_families import make_model

LR, WD, STEPS = 1e-3, 0.1, 3


def _layer(model):
    return model.get_base_model().model.layers[0].mlp.experts


def _train(official: bool):
    """3 AdamW steps on the ESFT deltas; next to them, the authors' setup: AdamW on the expert weights themselves,
    given the same gradients. Returns (W + delta, the authors' weights) after the steps."""
    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1, 6]}))
    layer = _layer(model)
    reference = {name: weight.detach().clone().requires_grad_() for name, weight in layer.base_weights("default").items()}
    deltas = dict(layer.esft_delta["default"].items())
    optimizer = torch.optim.AdamW(list(deltas.values()), lr=LR, betas=(0.9, 0.95), weight_decay=WD)
    authors = torch.optim.AdamW(list(reference.values()), lr=LR, betas=(0.9, 0.95), weight_decay=WD)
    if official:
        decay_expert_weights(model, optimizer)
    for step in range(STEPS):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        for name, weight in reference.items():
            weight.grad = deltas[name].grad.clone()
        optimizer.step()
        authors.step()
        optimizer.zero_grad()
    trained = {name: (layer.base_weights("default")[name] + deltas[name]).detach() for name in deltas}
    return trained, {name: weight.detach() for name, weight in reference.items()}


def test_official_decay_matches_adamw_on_the_expert_weights():
    trained, authors = _train(official=True)
    for name in trained:
        torch.testing.assert_close(trained[name], authors[name], atol=1e-6, rtol=0)


def test_default_decay_pulls_toward_the_base_not_toward_zero():
    trained, authors = _train(official=False)
    gap = max((trained[name] - authors[name]).abs().max().item() for name in trained)
    # the authors' decay removes lr * wd * W per step more from the weights: about 3e-4 * |W| after 3 steps
    assert 1e-5 < gap < 1e-3, gap


def test_official_decay_refuses_an_optimizer_without_deltas():
    model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1]}))
    with pytest.raises(ValueError, match="trains no ESFT delta"):
        decay_expert_weights(model, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))


def test_trainer_callback_applies_the_official_decay(tmp_path):
    results = {}
    for official in (False, True):
        model = get_peft_model(make_model("qwen3_moe"), ESFTConfig(experts={0: [1, 6]}))
        data = [{"input_ids": ids, "labels": ids} for ids in batch(0, (8, 16))]
        args = esft_training_arguments(str(tmp_path / str(official)), max_steps=2, learning_rate=LR,
                                       per_device_train_batch_size=4, gradient_checkpointing=False, bf16=False)
        callbacks = [ExpertWeightDecayCallback()] if official else []
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
        layer = _layer(model)
        results[official] = {n: (layer.base_weights("default")[n] + d).detach() for n, d in layer.esft_delta["default"].items()}
    # 2 steps at lr 1e-3, wd 0.1: the official run's weights are (1 - 1e-4)^2 times smaller in the decay part
    shrink = results[False]["down_proj"].abs().sum() - results[True]["down_proj"].abs().sum()
    assert shrink > 0
