"""The esft-peft command line, end to end on a tiny local MoE with a local tokenizer and JSONL data."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors import safe_open

from esft_peft.demo import synthetic_tasks as st
from esft_peft.cli.main import build_parser, main
from esft_helpers import demo_workspace

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %} ={% endif %} {% endfor %}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    demo_workspace(root, 24)
    with open(root / "chat.jsonl", "w") as handle:
        for text in st.make_texts("copy", 8):
            prompt, answer = text.split(" = ")
            messages = [{"role": "user", "content": f"{prompt}"}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    (root / "template.jinja").write_text(CHAT_TEMPLATE)
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def safetensors_keys(directory: Path) -> set[str]:
    keys = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            keys |= set(handle.keys())
    return keys


def test_help_everywhere(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"score", "select", "train", "merge", "push", "convert", "export-lora", "demo"}
    for argv in [["--help"]] + [[name, "--help"] for name in commands]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: esft-peft") and "--help" in out


@pytest.mark.parametrize(
    "argv",
    [[], ["select", "--scores", "s.json", "--top-p", "2", "--out", "x.json"], ["score", "--model", "m"],
     ["convert", "--base", "m", "--out", "o"], ["select", "--scores", "s", "--score-function", "best", "--out", "o"]],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_missing_files_give_one_line_errors(workspace, tmp_path, capsys):
    cases = [
        ["select", "--scores", tmp_path / "missing.json", "--out", tmp_path / "cfg.json"],
        ["score", "--model", workspace / "model", "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "s.json"],
        ["score", "--model", tmp_path / "no_model", "--data", workspace / "data.jsonl", "--out", tmp_path / "s.json"],
        ["score", "--model", workspace / "model", "--data", workspace / "data.jsonl", "--text-column", "prompt",
         "--out", tmp_path / "s.json"],
        ["merge", "--base", workspace / "model", "--adapter", tmp_path / "nothing", "--out", tmp_path / "merged"],
    ]
    for argv in cases:
        code, _, err = run(argv, capsys)
        assert code == 1, argv
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith("esft-peft ") and "Traceback" not in err, err
    assert not (tmp_path / "merged").exists()


def test_score_select_train_merge_convert_push(workspace, tmp_path, capsys, monkeypatch):
    model, data = workspace / "model", workspace / "data.jsonl"
    code, out, err = run(["score", "--model", model, "--data", data, "--out", tmp_path / "scores.json",
                          "--heatmap", tmp_path / "heatmap.png", "--token-budget", "500", "--batch-size", "8"], capsys)
    assert code == 0, err
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["token_scores"]) == {"0"}

    code, out, err = run(["select", "--scores", tmp_path / "scores.json", "--score-function", "gate", "--top-p", "0.3",
                          "--out", tmp_path / "expert_cfg.json"], capsys)
    assert code == 0, err
    expert_config = json.loads((tmp_path / "expert_cfg.json").read_text())
    assert set(expert_config) == {"experts", "shared_experts", "non_expert_modules", "num_experts"}
    assert expert_config["experts"]["0"]

    code, out, err = run(["train", "--model", model, "--data", data, "--expert-config", tmp_path / "expert_cfg.json",
                          "--out", tmp_path / "adapter", "--max-steps", "2", "--batch-size", "4",
                          "--learning-rate", "1e-2", "--no-gradient-checkpointing"], capsys)
    assert code == 0, err
    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in adapter.iterdir()}
    deltas = safetensors_keys(adapter)
    assert deltas and all(".esft_delta." in key for key in deltas)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        assert any(handle.get_tensor(key).abs().sum() > 0 for key in handle.keys())

    code, out, err = run(["merge", "--base", model, "--adapter", adapter, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert safetensors_keys(tmp_path / "merged") == safetensors_keys(model)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    code, out, err = run(["convert", "--to-official", adapter, "--base", model, "--out", tmp_path / "official"], capsys)
    assert code == 0, err
    assert (tmp_path / "official" / "expert_cfg.json").is_file()
    code, out, err = run(["convert", "--from-official", tmp_path / "official", "--base", model,
                          "--out", tmp_path / "adapter_again"], capsys)
    assert code == 0, err
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "adapter_again" / "adapter_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=0, atol=1e-6)

    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: uploaded.update(
        {op.path_in_repo: Path(op.path_or_fileobj).read_text(errors="ignore") for op in operations}))
    code, out, err = run(["push", "--adapter", adapter, "--repo", "org/esft-demo"], capsys)
    assert code == 0, err
    assert set(uploaded) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert "org/esft-demo" in uploaded["README.md"] and "- esft" in uploaded["README.md"]


def test_messages_column_with_chat_template(workspace, tmp_path, capsys):
    argv = ["score", "--model", workspace / "model", "--data", workspace / "chat.jsonl", "--messages-column",
            "messages", "--out", tmp_path / "scores.json"]
    code, _, err = run(argv, capsys)
    assert code == 1 and "chat template" in err
    code, _, err = run(argv + ["--chat-template", workspace / "template.jinja"], capsys)
    assert code == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    tokens_per_example = 7  # the answer: 6 digits and </s>; prompt turns are not counted
    assert sum(scores["token_counts"].values()) == 8 * tokens_per_example


def test_train_on_conversations_labels_only_assistant_turns(workspace, tmp_path, capsys):
    from esft_peft.cli.main import encode_messages, load_tokenizer

    tokenizer = load_tokenizer(str(workspace / "model"), str(workspace / "template.jinja"))
    messages = [{"role": "user", "content": "<copy> 1 2 3 4 5 6"}, {"role": "assistant", "content": "1 2 3 4 5 6 </s>"}]
    encoded = encode_messages(tokenizer, messages, max_length=64, train_on_prompt=False)
    assert [t for t in encoded["labels"] if t != -100] == tokenizer("1 2 3 4 5 6 </s>", add_special_tokens=False)["input_ids"]
    assert encode_messages(tokenizer, messages, 64, train_on_prompt=True)["labels"] == encoded["input_ids"]

    (tmp_path / "cfg.json").write_text(json.dumps({"experts": {"0": [0]}}))
    code, _, err = run(["train", "--model", workspace / "model", "--data", workspace / "chat.jsonl",
                        "--messages-column", "messages", "--chat-template", workspace / "template.jinja",
                        "--expert-config", tmp_path / "cfg.json", "--out", tmp_path / "adapter", "--max-steps", "1",
                        "--batch-size", "2"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "adapter" / "expert_cfg.json").read_text())["experts"] == {"0": [0]}
