"""A selection or adapter made for another model fails on the model-identity check, not on the expert-id range
check (issue 17, 2.3): in get_peft_model, PeftModel.from_pretrained, CLI train and CLI merge."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from esft_peft import ESFTConfig, score_experts
from esft_peft.cli.main import main
from esft_peft.demo import synthetic_tasks as st
from tiny_families import make_model

SCORED_ELSEWHERE = "selected from scores of a model with 16 experts in this layer, but this model has 8.*score this model"
OTHER_FAMILY = "created for a 'mixtral' model, but the base model is 'olmoe'"
OTHER_COUNT = "expects 16 experts .* but the base model has 8 experts"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A local 8-expert olmoe with a tokenizer and data; a selection scored on a 16-expert olmoe; adapters for a
    16-expert mixtral and a 16-expert olmoe, each training expert 15."""
    root = tmp_path_factory.mktemp("identity")
    tokenizer = st.build_tokenizer()
    vocab = len(tokenizer)
    make_model("olmoe", vocab_size=vocab).save_pretrained(root / "olmoe")
    tokenizer.save_pretrained(root / "olmoe")
    with open(root / "data.jsonl", "w") as handle:
        for text in st.make_texts("double", 4):
            handle.write(json.dumps({"text": text}) + "\n")
    bigger = make_model("olmoe", vocab_size=vocab, num_experts=16)
    scores = score_experts(bigger, [{"input_ids": torch.randint(0, vocab, (2, 8))}], show_progress=False)
    selection = {layer: [15] for layer in scores.token_scores}
    ESFTConfig(experts=_scored(selection, 16)).save_expert_config(root / "scored16.json")
    for family, key in (("mixtral", "num_local_experts"), ("olmoe", "num_experts")):
        other = make_model(family, vocab_size=vocab, **{key: 16})
        get_peft_model(other, ESFTConfig(experts={0: [15]})).save_pretrained(root / f"{family}16")
    return root


def _scored(selection: dict, count: int):
    from esft_peft.scoring.scores import ExpertSelection

    return ExpertSelection(selection, {layer: count for layer in selection})


def _olmoe(workspace):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workspace / "olmoe").eval()


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_get_peft_model_checks_the_scored_model_before_the_ids(workspace):
    with pytest.raises(ValueError, match=SCORED_ELSEWHERE):
        get_peft_model(_olmoe(workspace), ESFTConfig(experts=_scored({"0": [15]}, 16)))
    with pytest.raises(ValueError, match=SCORED_ELSEWHERE):
        get_peft_model(_olmoe(workspace), ESFTConfig.from_expert_config(workspace / "scored16.json"))


@pytest.mark.parametrize(("adapter", "message"), [("mixtral16", OTHER_FAMILY), ("olmoe16", OTHER_COUNT)])
def test_loading_checks_the_base_model_before_the_ids(workspace, adapter, message):
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(_olmoe(workspace), workspace / adapter)
    model = get_peft_model(_olmoe(workspace), ESFTConfig(experts={0: [1]}))
    with pytest.raises(ValueError, match=message):
        model.load_adapter(workspace / adapter, adapter_name="other")
    assert list(model.peft_config) == ["default"]


def test_cli_train_checks_the_scored_model_before_the_ids(workspace, tmp_path, capsys):
    code, err = run(["train", "--model", workspace / "olmoe", "--data", workspace / "data.jsonl",
                     "--expert-config", workspace / "scored16.json", "--out", tmp_path / "adapter"], capsys)
    assert code == 1 and "score this model" in err and "out of range" not in err, err
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(("adapter", "message"), [("mixtral16", OTHER_FAMILY), ("olmoe16", "expects 16 experts")])
def test_cli_merge_checks_the_base_model_before_the_ids(workspace, tmp_path, adapter, message, capsys):
    code, err = run(["merge", "--base", workspace / "olmoe", "--adapter", workspace / adapter,
                     "--out", tmp_path / "merged"], capsys)
    assert code == 1 and message.replace("\\", "") in err and "out of range" not in err, err
    assert not (tmp_path / "merged").exists()
