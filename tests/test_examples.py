"""The example scripts run end to end on tiny settings (their figures are recorded in docs/ from full runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_paper_in_miniature_writes_results_tables_and_figures(tmp_path):
    out = run_example("paper_in_miniature.py", "--size", "quick", "--seeds", "0", "--out", "run", cwd=tmp_path)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(u["architecture"], u["seed"]) for u in results["units"]] == [("fine", 0), ("coarse", 0)]
    assert {f["claim"] for f in results["findings"]} and "### Table 1" in out
    assert (tmp_path / "run" / "tables.md").read_text().strip() in out
    figures = {path.name for path in (tmp_path / "run" / "figures").iterdir()}
    assert {"miniature_overlap.png", "miniature_fine_law.png", "miniature_coarse_law.png"} <= figures
    again = run_example("paper_in_miniature.py", "--from-results", "run/results.json", "--out", "again", cwd=tmp_path)
    assert (tmp_path / "again" / "tables.md").read_text() == (tmp_path / "run" / "tables.md").read_text()
    assert again.count("### ") == out.count("### ")


def test_lr_sweep_prints_one_row_per_rate(tmp_path):
    out = run_example("lr_sweep.py", "--size", "quick", "--seeds", "0", "--rates", "1e-3", "1e-2", cwd=tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| learning rate | law (trained), seeds 0 |")
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| base, before ESFT", "| 0.001", "| 0.01 (the demo's)"]


def test_pesc_miniature_compares_lora_and_pesc(tmp_path):
    run_example("pesc_miniature.py", "--seeds", "0", "--experts", "2", "4", "--pretrain-steps", "2",
                "--tune-steps", "2", "--json", "pesc.json", cwd=tmp_path)
    results = json.loads((tmp_path / "pesc.json").read_text())["0"]
    assert list(results) == ["dense LoRA", "PESC E=2", "PESC E=4"]
    trainable = [results[name]["trainable"] for name in results]
    assert trainable[0] < trainable[1] < trainable[2]
    assert all(set(r["accuracy"]) == {"sort", "double", "modsum"} for r in results.values())
