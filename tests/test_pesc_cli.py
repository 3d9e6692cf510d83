"""``esft-peft train --method pesc`` end to end on a tiny local dense llama, then ``push`` to a fake Hub."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from esft_peft.cli.main import main
from esft_peft.demo import synthetic_tasks as st
from pesc_helpers import pesc_layers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pesc_cli")
    tokenizer = st.build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as handle:
        for text in st.make_texts("reverse", 16):
            handle.write(json.dumps({"text": text}) + "\n")
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_pesc_writes_adapter_and_card_then_push(workspace, tmp_path, capsys, monkeypatch):
    model, data, out = workspace / "model", workspace / "data.jsonl", tmp_path / "pesc"
    code, stdout, err = run(["train", "--method", "pesc", "--model", model, "--data", data, "--out", out,
                             "--num-experts", "4", "--top-k", "2", "--adapter-dim", "8", "--lora-r", "4",
                             "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-2",
                             "--no-gradient-checkpointing"], capsys)
    assert code == 0, err
    assert "crafting 2 MLPs into 4 adapter experts (top-2)" in stdout
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "trainer_state.json"} <= \
        {p.name for p in out.iterdir()}
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PESC" and saved["num_experts"] == 4 and saved["lora_r"] == 4
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert any(k.endswith(".pesc_up") and handle.get_tensor(k).abs().sum() > 0 for k in keys)
        assert any(".pesc_lora_A." in k for k in keys)
    card = (out / "README.md").read_text()
    assert "- pesc" in card and "# PESC adapter" in card and "| num_experts | 4 |" in card and "| top_k | 2 |" in card
    assert "r=4, alpha=16" in card and str(model) in card
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    loaded = PeftModel.from_pretrained(base, out)
    assert len(pesc_layers(loaded)) == 2

    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: uploaded.update(
        {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}, message=kw["commit_message"]))
    code, stdout, err = run(["push", "--adapter", out, "--repo", "org/pesc-demo"], capsys)
    assert code == 0, err
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(uploaded)
    assert "org/pesc-demo" in uploaded["README.md"].decode() and "- pesc" in uploaded["README.md"].decode()
    assert uploaded["message"] == "Upload PESC adapter"


def test_bad_pesc_settings_and_missing_expert_config_are_one_line_errors(workspace, tmp_path, capsys):
    common = ["--model", workspace / "model", "--data", workspace / "data.jsonl", "--out", tmp_path / "x"]
    for argv, message in (
        (["train", "--method", "pesc", "--num-experts", "4", "--top-k", "5", *common], "top_k"),
        (["train", *common], "--expert-config is required"),
    ):
        code, _, err = run(argv, capsys)
        assert code == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
