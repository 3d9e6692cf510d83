"""``save_pretrained`` and ``push_to_hub``, as peft users call them, write the method's model card (ESFT and PESC)
through peft's own card path, keeping what the user wrote in README.md."""

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, get_peft_model

from esft_peft import ESFTConfig, PESCConfig
from esft_peft.interop.card_section import SECTION_END, SECTION_START
from tiny_dense import make_dense_model
from tiny_families import make_model


def esft_model():
    base = make_model("qwen3_moe")
    base.name_or_path = "org/base"
    return get_peft_model(base, ESFTConfig(experts={"1": [0, 5]}))


def test_save_pretrained_writes_the_esft_card_with_peft_additions(tmp_path):
    esft_model().save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert {"esft", "mixture-of-experts"} <= set(card.data.tags) and card.data.library_name == "peft"
    assert "| 1 | 0, 5 |" in card.text and "import esft_peft" in card.text
    assert "- PEFT " in card.text  # peft's own update ran too
    assert "[More Information Needed]" not in card.text  # not the generic template


def test_user_text_in_readme_is_kept_and_the_section_is_refreshed(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n# My adapter\n\nMy own notes.\n")
    model = esft_model()
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # twice: one section, refreshed
    text = (tmp_path / "README.md").read_text()
    card = ModelCard.load(tmp_path / "README.md")
    assert "My own notes." in text and "# My adapter" in text and card.data.license == "mit"
    assert {"mine", "esft"} <= set(card.data.tags)
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1 and "| 1 | 0, 5 |" in text


def test_pesc_save_pretrained_writes_the_pesc_card(tmp_path):
    model = get_peft_model(make_dense_model("llama"), PESCConfig(num_experts=4, top_k=2, adapter_dim=8))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "pesc" in card.data.tags and "import esft_peft" in card.text and "num_experts | 4" in card.text


def test_other_methods_keep_peft_s_card(tmp_path):
    lora = get_peft_model(make_model("qwen3_moe"), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert SECTION_START not in text and "esft" not in ModelCard.load(tmp_path / "README.md").data.tags


@pytest.mark.parametrize("remote_card", [None, "---\ntags:\n- mine\n---\n# Ours\n\nWritten on the Hub.\n"])
def test_push_to_hub_uploads_the_esft_card(monkeypatch, tmp_path, remote_card):
    uploaded = {}

    def fake_download(self, repo_id, filename, **kwargs):
        if remote_card is None:
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError("no README.md")
        (tmp_path / filename).write_text(remote_card)
        return str(tmp_path / filename)

    def fake_create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        return type("CommitInfo", (), {"commit_url": "url", "oid": "0"})()

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(HfApi, "hf_hub_download", fake_download)
    esft_model().push_to_hub("org/name", tags=["extra"])
    readme = uploaded["README.md"].decode()
    assert set(uploaded) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert "| 1 | 0, 5 |" in readme and 'PeftModel.from_pretrained(base, "org/name")' in readme
    assert {"esft", "extra"} <= set(ModelCard(readme).data.tags)
    if remote_card is not None:
        assert "Written on the Hub." in readme and "mine" in ModelCard(readme).data.tags
