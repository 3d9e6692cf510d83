"""transformers.Trainer and TRL's SFTTrainer on ESFT models: checkpointing, bf16, exact resume, best model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer

from esft_peft import ESFTConfig
from esft_peft.training import esft_training_arguments, set_router_aux_loss
from esft_helpers import delta_params, selection, state_copy
from tiny_families import make_model

def token_dataset(n: int = 24, length: int = 16, seed: int = 0) -> Dataset:
    ids = torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def arguments(tmp_path, **overrides):
    defaults = dict(max_steps=4, learning_rate=1e-3, per_device_train_batch_size=4, use_cpu=True, seed=0,
                    dataloader_num_workers=0, disable_tqdm=True, logging_steps=1)
    return esft_training_arguments(str(tmp_path), **{**defaults, **overrides})


def trainer_for(tmp_path, family="qwen3_moe", **overrides) -> Trainer:
    base = make_model(family)
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    return Trainer(model=model, args=arguments(tmp_path, **overrides), train_dataset=token_dataset(),
                   eval_dataset=token_dataset(8, seed=1))


def test_paper_defaults():
    args = esft_training_arguments("unused")
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.weight_decay) == (1e-5, 0.9, 0.95, 0.1)
    assert args.lr_scheduler_type == "constant" and args.max_steps == 500 and args.gradient_checkpointing


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "gpt_oss"])
def test_trainer_with_gradient_checkpointing_and_bf16(tmp_path, family):
    trainer = trainer_for(tmp_path, family, bf16=True)
    base_before = {k: v for k, v in state_copy(trainer.model.get_base_model()).items() if "esft_delta" not in k}
    trainer.train()
    assert trainer.model.get_base_model().is_activation_checkpointing
    deltas = delta_params(trainer.model)
    assert deltas and all(d.abs().sum() > 0 for d in deltas.values())
    after = trainer.model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in decayed}
    assert names and all(".esft_delta." in n for n in names)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in deltas.values()}


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    uninterrupted = trainer_for(tmp_path / "a", max_steps=6, save_strategy="no")
    uninterrupted.train()
    expected = {n: p.detach().clone() for n, p in delta_params(uninterrupted.model).items()}

    first = trainer_for(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    resumed = trainer_for(tmp_path / "c", max_steps=6, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = delta_params(resumed.model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_load_best_model_at_end(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                          save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    from safetensors.torch import load_file

    saved = load_file(f"{best}/adapter_model.safetensors")
    current = {n.replace(".esft_delta.default.", ".esft_delta."): p for n, p in delta_params(trainer.model).items()}
    assert saved.keys() == current.keys()
    assert all(torch.equal(saved[k], current[k].detach()) for k in saved)


def test_trl_sft_trainer_with_esft_peft_config(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from esft_peft.demo.synthetic_tasks import build_tokenizer

    tokenizer = build_tokenizer()
    model = make_model("qwen3_moe", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    data = Dataset.from_dict({"text": [" ".join(str((i * 7 + j) % 10) for j in range(12)) for i in range(16)]})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                     use_cpu=True, report_to=[], disable_tqdm=True, max_length=32, gradient_checkpointing=True,
                     weight_decay=0.1, save_strategy="no")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=ESFTConfig(experts={0: [0, 3]}))
    trainer.train()
    deltas = delta_params(trainer.model)
    assert deltas and all(d.abs().sum() > 0 for d in deltas.values())
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == set(deltas)


def test_router_aux_loss_switch():
    base = make_model("qwen3_moe")
    model = get_peft_model(base, ESFTConfig(experts=selection(base), train_router=True))
    ids = token_dataset(4)["input_ids"]
    batch = torch.tensor(ids)
    plain = model(input_ids=batch, labels=batch).loss
    set_router_aux_loss(model, True, coef=0.5)
    with_aux = model(input_ids=batch, labels=batch)
    assert with_aux.aux_loss is not None
    torch.testing.assert_close(with_aux.loss, plain + 0.5 * with_aux.aux_loss)
    set_router_aux_loss(model, False)
    assert torch.equal(model(input_ids=batch, labels=batch).loss, plain)
    with pytest.raises(ValueError, match="has no router auxiliary loss"):
        set_router_aux_loss(make_model("modulelist"), True)
