"""The built-in demo in quick mode, through the CLI: every artifact, and reload/merge reproduce the trained model."""

import json

from esft_peft.cli import main


def test_quick_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "run"), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "trainable fraction" in out and "adapter size" in out and "double*" in out
    run = tmp_path / "run"
    for name in ("scores.json", "heatmap.png", "expert_cfg.json", "results.json", "adapter/adapter_model.safetensors",
                 "adapter/README.md", "merged/config.json", "base/tokenizer.json"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["reloaded"] == results["after"] == results["merged"]
    assert json.loads((run / "expert_cfg.json").read_text())["experts"] == results["experts"]
    assert 0 < results["trainable_fraction"] < 0.5
    assert results["esft_loss"]["last"] < results["esft_loss"]["first"]
    assert set(results["before"]) == {"copy", "reverse", "increment", "complement", "double"}
