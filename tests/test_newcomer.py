"""What a newcomer hit in their first hour (issue "A new user's first hour"), each fixed and held here."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from esft_peft import demo
from esft_peft.cli.main import main
from esft_peft.demo import synthetic_tasks as st

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer")
    model = demo.build_model(demo.load_settings("quick"), seed=0)
    model.save_pretrained(root / "models" / "moe")
    st.build_tokenizer().save_pretrained(root / "models" / "moe")
    texts = st.make_texts("double", 12)
    (root / "data.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    chats = [[{"role": "user", "content": t.split(" = ")[0]}, {"role": "assistant", "content": t.split(" = ")[1]}]
             for t in texts]
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    (root / "expert_cfg.json").write_text(json.dumps({"experts": {"0": [1, 5]}, "shared_experts": False,
                                                      "non_expert_modules": False}))
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_relative_model_path_is_recorded_absolute_and_loads_from_elsewhere(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    code, _, err = run(["train", "--model", "models/moe", "--data", "data.jsonl", "--expert-config", "expert_cfg.json",
                        "--out", tmp_path / "adapter", "--max-steps", "1", "--batch-size", "4"], capsys)
    assert code == 0, err
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((workspace / "models" / "moe").resolve())
    assert f"base_model: {recorded}" in (tmp_path / "adapter" / "README.md").read_text()
    monkeypatch.chdir(tmp_path)  # another working directory: the adapter still finds its base, offline
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert model.peft_config["default"].peft_type.value == "ESFT"


@pytest.mark.parametrize("name", ["models/nope", "nope"])
def test_mistyped_local_path_says_no_local_directory_and_no_hub_repo(workspace, tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(workspace)
    code, _, err = run(["score", "--model", name, "--data", "data.jsonl", "--out", tmp_path / "s.json"], capsys)
    assert code == 1
    assert "no local directory" in err and "Hub" in err and name in err, err
    assert len(err.strip().splitlines()) == 1


def test_text_column_missing_suggests_messages_column(workspace, tmp_path, capsys):
    code, _, err = run(["score", "--model", workspace / "models" / "moe", "--data", workspace / "chat.jsonl",
                        "--out", tmp_path / "s.json"], capsys)
    assert code == 1 and "--messages-column messages" in err, err


def test_pesc_on_an_moe_base_points_to_esft(workspace, tmp_path, capsys):
    code, _, err = run(["train", "--method", "pesc", "--model", workspace / "models" / "moe", "--data",
                        workspace / "data.jsonl", "--out", tmp_path / "p", "--max-steps", "1"], capsys)
    assert code == 1 and "already a Mixture-of-Experts" in err and "--expert-config" in err, err
    assert not (tmp_path / "p").exists()


def test_pesc_options_are_refused_with_esft(workspace, tmp_path, capsys):
    code, _, err = run(["train", "--model", workspace / "models" / "moe", "--data", workspace / "data.jsonl",
                        "--expert-config", workspace / "expert_cfg.json", "--out", tmp_path / "a",
                        "--num-experts", "4", "--lora-r", "8"], capsys)
    assert code == 1 and "--num-experts" in err and "--lora-r" in err and "--method pesc" in err, err
    assert not (tmp_path / "a").exists()


def test_score_summary_counts_what_was_scored(workspace, tmp_path, capsys):
    code, out, err = run(["score", "--model", workspace / "models" / "moe", "--data", workspace / "data.jsonl",
                          "--out", tmp_path / "s.json", "--token-budget", "40", "--batch-size", "2"], capsys)
    assert code == 0, err
    scored = json.loads((tmp_path / "s.json").read_text())
    counted = scored["metadata"]["num_tokens"]
    assert counted == 40
    assert out.startswith(f"expert scores of {scored['num_sequences']} examples (40 tokens; the token budget")
    assert scored["num_sequences"] < 12 and f"left {12 - scored['num_sequences']} of 12 examples unscored" in out


def test_scoring_progress_bar_ends_at_what_the_data_held(monkeypatch):
    from esft_peft.scoring import score as score_module

    bars = []

    class Bar:
        def __init__(self, total=None, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, added):
            self.n += added

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(score_module, "tqdm", Bar)
    model = demo.build_model(demo.load_settings("quick"), seed=0)
    data = [{"input_ids": torch.randint(0, 20, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    score_module.score_experts(model, data, token_budget=10_000)
    assert bars[0].n == 16 and bars[0].total == 16  # 100%, not 16 / 10,000


def test_cli_shows_other_libraries_warnings_and_records_only_with_verbose(monkeypatch, capsys):
    """The CLI prints its own output; other libraries' warnings and log records below ERROR need --verbose."""
    cli_main = sys.modules["esft_peft.cli.main"]  # the package re-exports the function under the same name

    def noisy(args):
        warnings.warn("a third-party FutureWarning", FutureWarning)
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
        logging.getLogger("some_library").warning("a library notice")
        logging.getLogger("esft_peft.cli").warning("our own warning")
        print("our output")

    monkeypatch.setattr(cli_main, "cmd_demo", noisy)
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(warnings, "showwarning",  # print warnings, as Python does outside pytest
                        lambda message, category, *args, **kwargs: print(f"{category.__name__}: {message}",
                                                                         file=sys.stderr))
    deepspeed_records = []  # DeepSpeed logs through a handler of its own (propagate=False)
    spy = type("Spy", (logging.Handler,), {"emit": lambda self, record: deepspeed_records.append(record)})()
    monkeypatch.setattr(logging.getLogger("DeepSpeed"), "handlers", [spy])
    monkeypatch.setattr(logging.getLogger("DeepSpeed"), "propagate", False)
    for verbose in (False, True):
        deepspeed_records.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            code = main((["--verbose"] if verbose else []) + ["demo", "--out", "unused"])
        out, err = capsys.readouterr()
        logging.root.handlers.clear()  # basicConfig again on the next run
        assert code == 0 and out == "our output\n"
        assert "our own warning" in err
        for noise in ("a third-party FutureWarning", "a library notice"):
            assert (noise in err) == verbose, (verbose, noise, err)
        assert bool(deepspeed_records) == verbose


def test_docs_say_what_newcomers_need():
    training = (ROOT / "docs" / "training.md").read_text()
    assert "bf16=False" in training and "{% generation %}" in training and "assistant_only_loss" in training
    faq = (ROOT / "docs" / "faq.md").read_text()
    assert "KeyError: 'ESFT'" in faq and "import esft_peft" in faq
    mixed = faq[faq.index("adapter_names"):][:1500]
    assert "ESFT" in mixed and "PESC" in mixed


def test_fresh_process_without_import_gets_peft_keyerror_but_card_says_import(workspace, tmp_path, capsys):
    """peft has no plugin entry point: a process that never imports esft_peft cannot know "ESFT". The card and the
    docs say so; a process that does import it (whatever the order) loads the adapter."""
    code, _, err = run(["train", "--model", workspace / "models" / "moe", "--data", workspace / "data.jsonl",
                        "--expert-config", workspace / "expert_cfg.json", "--out", tmp_path / "a", "--max-steps", "1",
                        "--batch-size", "4"], capsys)
    assert code == 0, err
    assert "import esft_peft" in (tmp_path / "a" / "README.md").read_text()
    load = f"from peft import AutoPeftModelForCausalLM\nAutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'a')!r})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    without = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300)
    assert without.returncode != 0 and "ESFT" in without.stderr
    with_import = subprocess.run([sys.executable, "-c", "import esft_peft\n" + load], capture_output=True, text=True,
                                 env=env, timeout=300)
    assert with_import.returncode == 0, with_import.stderr
