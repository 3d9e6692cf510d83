"""Hub round trip without network: loading from a local Hub cache in offline mode, and push_adapter's commit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import get_peft_model

from esft_peft import ESFTConfig
from esft_peft.interop.hub import adapter_statistics, model_card_text, push_adapter, write_model_card
from esft_helpers import logits, train_steps
from tiny_families import make_model

TESTS = Path(__file__).parent
SELECTION = {"1": [0, 5], "2": [3]}


@pytest.fixture()
def trained():
    base = make_model("deepseek_v2")
    base.name_or_path = "org/base"
    model = get_peft_model(base, ESFTConfig(experts=SELECTION))
    train_steps(model, steps=2, lr=1e-2)
    return model.eval()


def test_model_card_content(trained, tmp_path):
    card = write_model_card(trained, tmp_path, repo_id="org/name").read_text()
    metadata = card.split("---")[1]
    assert "base_model: org/base" in metadata and "library_name: peft" in metadata
    assert "- esft" in metadata and "- moe" in metadata
    stats = adapter_statistics(trained)
    expected = sum(p.numel() for n, p in trained.named_parameters() if ".esft_delta.default." in n)
    assert stats["adapter_parameters"] == expected > 0
    assert f"{100 * stats['trainable_fraction']:.2f}%" in card
    assert "| 1 | 0, 5 | 8 |" in card and "| 2 | 3 | 8 |" in card
    assert 'PeftModel.from_pretrained(base, "org/name")' in card and "import esft_peft" in card
    assert json.loads(card.split("```json\n")[1].split("\n```")[0])["experts"] == SELECTION


def test_load_by_repo_id_from_offline_hub_cache(trained, tmp_path):
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("a1" * 20)
    trained.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--org--name" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--name" / "refs" / "main").write_text("a1" * 20)
    torch.save(logits(trained), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(TESTS)!r})
import esft_peft
from peft import PeftModel
from esft_helpers import logits
from tiny_families import make_model
model = PeftModel.from_pretrained(make_model("deepseek_v2"), "org/name")
assert model.peft_config["default"].experts == {SELECTION!r}
torch.testing.assert_close(logits(model), torch.load({str(tmp_path / "expected.pt")!r}))
print("LOADED")
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED" in result.stdout


def test_push_adapter_commits_weights_config_and_card(trained, monkeypatch):
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls["commit_kwargs"] = kwargs
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    assert push_adapter(trained, "org/name", private=True) == "commit-info"
    assert calls["repo"][0] == "org/name" and calls["repo"][1]["private"] is True
    files = calls["commit"]
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert json.loads(files["adapter_config.json"])["experts"] == SELECTION
    generated = model_card_text(trained, "org/name")
    section = generated[generated.index("<!-- esft-peft"):]
    assert section in files["README.md"].decode()  # esft-peft's card, updated by peft (tags, version)
    from safetensors.torch import load

    weights = load(files["adapter_model.safetensors"])
    assert weights and all(".esft_delta." in key for key in weights)


def test_model_card_refuses_non_esft_adapter():
    from peft import LoraConfig

    lora = get_peft_model(make_model("qwen3_moe"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not an ESFT adapter"):
        model_card_text(lora)
