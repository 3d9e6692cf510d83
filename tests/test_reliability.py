"""Reliability: no data loss in outputs, a clear error for each bad input, adapter files checked before loading,
and the authors' format for partial adapters."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from esft_peft import ESFTConfig, ExpertScores, score_experts
from esft_peft.cli.main import main
from esft_peft.demo import synthetic_tasks as st
from esft_peft.files import CorruptAdapterError
from esft_peft.interop.official import load_official_adapter, save_official_adapter
from esft_peft.training import esft_training_arguments
from tiny_families import make_model

WEIGHTS = "adapter_model.safetensors"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny local qwen3_moe (2 MoE layers, 8 experts) with the synthetic tokenizer, data and a trained adapter."""
    root = tmp_path_factory.mktemp("reliability")
    tokenizer = st.build_tokenizer()
    model = make_model("qwen3_moe", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as handle:
        for text in st.make_texts("double", 16):
            handle.write(json.dumps({"text": text}) + "\n")
    (root / "expert_cfg.json").write_text(json.dumps({"experts": {"0": [1, 2]}, "shared_experts": False,
                                                      "non_expert_modules": False}))
    peft_model = get_peft_model(make_model("qwen3_moe", vocab_size=len(tokenizer)), ESFTConfig(experts={0: [1, 2]}))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(root / "adapter")
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def base(workspace):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workspace / "model").eval()


# ------------------------------------------------------------------------------------------------ no data loss


def test_merge_out_never_replaces_a_directory_with_user_files(workspace, tmp_path, capsys):
    project = tmp_path / "my_project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    argv = ["merge", "--base", workspace / "model", "--adapter", workspace / "adapter", "--out", project]
    code, _, err = run(argv, capsys)
    assert code == 1 and "--overwrite" in err and "not empty" in err
    assert (project / "notes.txt").read_text() == "mine"
    code, _, err = run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert (project / "config.json").is_file() and not (project / "notes.txt").exists()


@pytest.mark.parametrize("where", ["base", "inside_base", "adapter", "parent_of_base"])
def test_out_overlapping_an_input_is_refused_even_with_overwrite(workspace, where, capsys):
    out = {"base": workspace / "model", "inside_base": workspace / "model" / "merged",
           "adapter": workspace / "adapter", "parent_of_base": workspace}[where]
    before = _tree_digest(workspace)
    code, _, err = run(["merge", "--base", workspace / "model", "--adapter", workspace / "adapter", "--out", out,
                        "--overwrite"], capsys)
    assert code == 1 and "overlaps the input" in err
    assert _tree_digest(workspace) == before


def test_convert_out_equal_to_its_source_is_refused(workspace, capsys):
    code, _, err = run(["convert", "--to-official", workspace / "adapter", "--base", workspace / "model",
                        "--out", workspace / "adapter", "--overwrite"], capsys)
    assert code == 1 and "overlaps the input" in err


def test_train_out_pointing_at_a_file_is_refused_before_training(workspace, tmp_path, capsys, monkeypatch):
    target = tmp_path / "adapter.bin"
    target.write_text("keep")
    import transformers

    monkeypatch.setattr(transformers.Trainer, "train", lambda self: pytest.fail("training started"))
    code, _, err = run(["train", "--model", workspace / "model", "--data", workspace / "data.jsonl",
                        "--expert-config", workspace / "expert_cfg.json", "--out", target], capsys)
    assert code == 1 and "is an existing file" in err
    assert target.read_text() == "keep"


def test_file_outputs_are_not_replaced_without_overwrite(workspace, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    scores.write_text("{}")
    code, _, err = run(["score", "--model", workspace / "model", "--data", workspace / "data.jsonl", "--out", scores],
                       capsys)
    assert code == 1 and "already exists" in err and scores.read_text() == "{}"


def test_outputs_get_normal_permissions(workspace, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = run(["merge", "--base", workspace / "model", "--adapter", workspace / "adapter",
                            "--out", tmp_path / "merged"], capsys)
        assert code == 0, err
        peft_model = PeftModel.from_pretrained(base(workspace), workspace / "adapter")
        save_official_adapter(peft_model, tmp_path / "official")
        ESFTConfig(experts={0: [1]}).save_expert_config(tmp_path / "cfg.json")
    finally:
        os.umask(old)
    for root in (tmp_path / "merged", tmp_path / "official"):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in root.iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "cfg.json").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("command", ["score", "train"])
def test_nonexistent_local_model_names_the_path(workspace, tmp_path, command, capsys):
    argv = [command, "--model", tmp_path / "nowhere" / "model", "--data", workspace / "data.jsonl",
            "--out", tmp_path / "out"]
    argv += ["--expert-config", workspace / "expert_cfg.json"] if command == "train" else []
    code, _, err = run(argv, capsys)
    assert code == 1 and "not found" in err and "Repo id" not in err


def test_empty_data_file(workspace, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run(["score", "--model", workspace / "model", "--data", tmp_path / "empty.jsonl",
                        "--out", tmp_path / "s.json"], capsys)
    assert code == 1 and "is empty" in err and "StopIteration" not in err


def test_all_empty_texts_do_not_train(workspace, tmp_path, capsys):
    (tmp_path / "blank.jsonl").write_text("\n".join(json.dumps({"text": ""}) for _ in range(4)) + "\n")
    code, _, err = run(["train", "--model", workspace / "model", "--data", tmp_path / "blank.jsonl",
                        "--expert-config", workspace / "expert_cfg.json", "--out", tmp_path / "adapter"], capsys)
    assert code == 1 and "no token to train on" in err
    assert not (tmp_path / "adapter").exists()


def test_garbage_expert_config_names_the_file(workspace, tmp_path, capsys):
    bad = tmp_path / "expert_cfg.json"
    bad.write_text("{experts: oops")
    with pytest.raises(ValueError, match=str(bad).replace(".", r"\.") + " is not valid JSON"):
        ESFTConfig.from_expert_config(bad)
    code, _, err = run(["train", "--model", workspace / "model", "--data", workspace / "data.jsonl",
                        "--expert-config", bad, "--out", tmp_path / "adapter"], capsys)
    assert code == 1 and str(bad) in err


def test_official_booleans_are_parsed_strictly():
    config = ESFTConfig.from_expert_config({"experts": {"1": [0]}, "shared_experts": "false",
                                            "non_expert_modules": "True"})
    assert config.train_shared_experts is False and config.train_non_expert_modules is True
    with pytest.raises(ValueError, match="'shared_experts' must be true or false, got 'no'"):
        ESFTConfig.from_expert_config({"experts": {"1": [0]}, "shared_experts": "no"})
    with pytest.raises(ValueError, match="must be true or false, got 1"):
        ESFTConfig.from_expert_config({"experts": {"1": [0]}, "non_expert_modules": 1})


def test_numpy_integers_are_accepted_everywhere():
    order = np.argsort(np.array([0.1, 0.5, 0.3, 0.2]))[::-1]
    config = ESFTConfig(experts={np.int64(1): order[:2]})
    assert config.experts == {"1": [1, 2]} and all(type(i) is int for i in config.experts["1"])
    scores = ExpertScores(token_scores={"1": [0.1, 0.5, 0.3, 0.1]}, gate_scores={"1": [0.1, 0.5, 0.3, 0.1]})
    assert scores.select(top_k=np.int64(2)) == {"1": [1, 2]}
    assert scores.select(budget=np.int32(3)) == {"1": [1, 2, 0]}


def test_token_ids_beyond_the_vocabulary(workspace):
    model = base(workspace)
    vocab = model.get_input_embeddings().num_embeddings
    batch = {"input_ids": torch.tensor([[1, 2, vocab + 3]])}
    with pytest.raises(ValueError, match=f"token id {vocab + 3}, but the model's vocabulary has {vocab} tokens"):
        score_experts(model, [batch], show_progress=False)


def test_padding_without_attention_mask_is_not_counted(workspace, caplog):
    model = base(workspace)
    pad = model.config.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, pad, pad]])
    with caplog.at_level(logging.WARNING):
        scores = score_experts(model, [{"input_ids": ids}], show_progress=False)
    assert set(scores.token_counts.values()) == {6}
    assert "treated as padding" in caplog.text
    explicit = score_experts(model, [{"input_ids": ids, "attention_mask": (ids != pad).long()}], show_progress=False)
    assert scores.token_scores == explicit.token_scores


def test_scores_of_another_model_are_refused(workspace, tmp_path, capsys):
    small = make_model("qwen3_moe", vocab_size=22, num_experts=4)
    scores = score_experts(small, [{"input_ids": torch.randint(0, 22, (2, 8))}], show_progress=False)
    config = ESFTConfig(experts=scores.select(top_k=1))
    with pytest.raises(ValueError, match="selected from scores of a model with 4 experts .* this model has 8"):
        get_peft_model(base(workspace), config)
    with pytest.raises(ValueError, match="with 4 experts"):
        get_peft_model(base(workspace), scores.to_config())
    scores.save(tmp_path / "scores.json")
    code, _, err = run(["select", "--scores", tmp_path / "scores.json", "--model", workspace / "model",
                        "--out", tmp_path / "cfg.json"], capsys)
    assert code == 1 and "do not match this model" in err and not (tmp_path / "cfg.json").exists()
    code, _, err = run(["select", "--scores", tmp_path / "scores.json", "--top-k", "1", "--out", tmp_path / "cfg.json"],
                       capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "cfg.json").read_text())["num_experts"] == {"0": 4, "1": 4}
    code, _, err = run(["train", "--model", workspace / "model", "--data", workspace / "data.jsonl",
                        "--expert-config", tmp_path / "cfg.json", "--out", tmp_path / "adapter"], capsys)
    assert code == 1 and "scores were computed on another model" in err


def test_select_top_k_and_budget_on_the_command_line(workspace, tmp_path, capsys):
    scores = score_experts(base(workspace), [{"input_ids": torch.randint(0, 22, (2, 8))}], show_progress=False)
    scores.save(tmp_path / "scores.json")
    for flag, value, total in (("--top-k", "3", 6), ("--budget", "5", 5)):
        out = tmp_path / f"{flag[2:]}.json"
        code, _, err = run(["select", "--scores", tmp_path / "scores.json", flag, value, "--out", out], capsys)
        assert code == 0, err
        assert sum(map(len, json.loads(out.read_text())["experts"].values())) == total
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--scores", str(tmp_path / "scores.json"), "--top-k", "1", "--budget", "2",
              "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("sequences per forward pass (default: 8)", "(default: 0)", "(default: 4096)", "(default: tokens)",
                 "(default: 131072)", "(default: auto)", "(default: train)"):
        assert text in out, text


def test_training_arguments_pass_nothing_deprecated():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = esft_training_arguments("unused", gradient_checkpointing=False)
        assert args.gradient_checkpointing is False
        assert esft_training_arguments("unused").gradient_checkpointing is True


# ------------------------------------------------------------------------------------------------ adapter files


def _copy_adapter(workspace: Path, tmp_path: Path, edit_state=None, edit_config=None) -> Path:
    out = tmp_path / "edited"
    out.mkdir()
    state = load_file(str(workspace / "adapter" / WEIGHTS))
    config = json.loads((workspace / "adapter" / "adapter_config.json").read_text())
    if edit_state:
        edited = edit_state(state)
        state = edited if isinstance(edited, dict) else state
    if edit_config:
        edit_config(config)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _first(state: dict) -> str:
    return sorted(state)[0]


@pytest.mark.parametrize(
    ("edit_state", "edit_config", "message"),
    [
        (lambda s: s.update({"base_model.model.lm_head.esft_delta.weight": torch.zeros(22, 32)}), None,
         "holds 1 tensor\\(s\\) its config does not list"),
        (lambda s: s.update({_first(s): torch.zeros(3, *s[_first(s)].shape[1:])}), None,
         r"has shape \(3, .* need \(2, "),
        (lambda s: s.update({_first(s): torch.zeros(s[_first(s)].shape, dtype=torch.int32)}), None,
         "not floating point"),
        (lambda s: s[_first(s)].view(-1)[:5].fill_(float("nan")), None, "5 NaN/inf value"),
        (lambda s: s.pop(_first(s)), None, "lacks 1 tensor"),
        (None, lambda c: c.pop("base_layout"), "has no `base_layout`"),
        (None, lambda c: c["base_layout"]["0"].update(kind="module_list"), "stored as a ModuleList"),
    ],
    ids=["unlisted", "shape", "dtype", "nan", "missing", "no_base_layout", "other_layout"],
)
def test_bad_adapter_files_are_refused_before_loading(workspace, tmp_path, edit_state, edit_config, message):
    adapter = _copy_adapter(workspace, tmp_path, edit_state, edit_config)
    model = base(workspace)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, CorruptAdapterError), match=message):
        PeftModel.from_pretrained(model, adapter)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapter_saved_in_another_float_dtype_loads_with_a_warning(workspace, tmp_path, caplog):
    adapter = _copy_adapter(workspace, tmp_path, lambda s: {k: v.to(torch.bfloat16) for k, v in s.items()})
    with caplog.at_level(logging.WARNING):
        PeftModel.from_pretrained(base(workspace), adapter)
    assert "saved in bfloat16 and are cast to the base model's float32 on loading (exact)" in caplog.text


def test_pickle_save_warns(workspace, tmp_path):
    peft_model = PeftModel.from_pretrained(base(workspace), workspace / "adapter")
    with pytest.warns(UserWarning, match="cannot be loaded back"):
        peft_model.save_pretrained(tmp_path / "pickled", safe_serialization=False)


# ------------------------------------------------------------------------------------------------ official format


def test_partial_adapter_round_trips_through_the_authors_format(workspace, tmp_path, capsys):
    peft_model = PeftModel.from_pretrained(base(workspace), workspace / "adapter")
    with torch.no_grad():
        expected = peft_model(input_ids=torch.arange(12).view(1, 12)).logits
    save_official_adapter(peft_model, tmp_path / "official")
    expert_config = json.loads((tmp_path / "official" / "expert_cfg.json").read_text())
    assert expert_config["experts"] == {"0": [1, 2], "1": []}  # every MoE layer, as the authors' to_esft reads them

    weights_only = tmp_path / "from_train_py"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes((tmp_path / "official" / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="--expert-config"):
        load_official_adapter(base(workspace), weights_only)
    again = load_official_adapter(base(workspace), weights_only, expert_config=tmp_path / "official" / "expert_cfg.json")
    assert again.peft_config["default"].experts == {"0": [1, 2]}
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=torch.arange(12).view(1, 12)).logits, expected, rtol=0, atol=1e-6)

    code, _, err = run(["convert", "--from-official", weights_only, "--expert-config",
                        tmp_path / "official" / "expert_cfg.json", "--base", workspace / "model",
                        "--out", tmp_path / "converted"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["experts"] == {"0": [1, 2]}


def test_scores_normalised_across_layers_warn_on_load(tmp_path, caplog):
    path = tmp_path / "expert_scores.json"
    path.write_text(json.dumps({"token_scores": {"1": {"0": 0.2, "1": 0.3}, "2": {"0": 0.1, "1": 0.4}},
                                "gate_scores": {"1": {"0": 0.2, "1": 0.3}, "2": {"0": 0.1, "1": 0.4}}}))
    with caplog.at_level(logging.WARNING):
        ExpertScores.load(path)
    assert "do not sum to 1" in caplog.text and "generate_expert_config.py" in caplog.text
