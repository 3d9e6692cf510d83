"""``benchmarks/gpu.sh --cpu-smoke``: the GPU run's pipeline at tiny shapes on CPU writes every section."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_cpu_smoke_writes_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu-smoke", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "cpu-smoke.json").read_text())
    assert results["mode"] == "cpu-smoke" and results["device"] == "cpu"
    assert set(results["sections"]) == {"layer", "whole_model", "pesc", "scoring", "quantized", "quantized_r8",
                                           "quantized_recipe", "quantized_gc", "quantized_gc_r8", "ep"}
    assert set(results["commands"]) == set(results["sections"])
    assert "GPU run (cpu-smoke)" in done.stdout

    layer = results["sections"]["layer"]
    assert [run["tokens"] for run in layer["runs"]] == [64, 128]
    for run in layer["runs"]:
        assert set(run["cases"]) == {"frozen", "full FT", "ESFT 25%", "ESFT all"}
        for case in run["cases"].values():
            assert positive(case["ms"]) and positive(case["saved_mib"]) and positive(case["x_frozen"])
        assert run["cases"]["ESFT all"]["experts_trained"] == 8
        assert 0.25 <= run["cases"]["ESFT 25%"]["share"] <= 1

    methods = results["sections"]["whole_model"]["methods"]
    assert set(methods) == {"floor", "floor_moe", "esft (6/64)", "esft (64/64)", "fft", "lora"}
    for name, r in methods.items():
        assert positive(r["step_s"]), name
        if not name.startswith("floor"):
            assert positive(r["trainable"]) and positive(r["optimizer_bytes"]), name
    assert methods["esft (6/64)"]["trainable"] < methods["esft (64/64)"]["trainable"]

    pesc = results["sections"]["pesc"]["runs"]
    assert {(r["experts"], r["adapter_dim"]) for r in pesc} == {(4, 8), (4, 16)}
    for r in pesc:
        assert all(positive(r[key]) for key in ("frozen_ms", "PESC_ms", "loop_ms", "pesc_x_frozen", "loop_x_pesc"))

    scoring = results["sections"]["scoring"]["models"]
    assert set(scoring) == {"deepseek_v2", "qwen3_moe"}
    for r in scoring.values():
        assert all(positive(r[key]) for key in ("plain_tok_s", "scoring_tok_s", "ratio"))

    for section, rank in (("quantized", None), ("quantized_r8", 8), ("quantized_recipe", 8), ("quantized_gc", None),
                          ("quantized_gc_r8", 8)):
        quantized = results["sections"][section]
        assert quantized["settings"]["delta_rank"] == rank
        for base in ("bf16", "nf4"):
            assert all(positive(quantized[base][key]) for key in ("peak_mib", "static_mib", "routed_experts_mib"))
        assert quantized["nf4"]["routed_experts_mib"] < quantized["bf16"]["routed_experts_mib"]
        assert positive(quantized["peak_ratio"]) and positive(quantized["step_time_ratio"])

    (ep,) = results["sections"]["ep"]
    assert ep["ep"] == 1 and positive(ep["routed_expert_bytes"]) and positive(ep["optimizer_bytes"])


def test_gpu_mode_refuses_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "gpu.json")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr and "--cpu-smoke" in done.stderr
    assert not (tmp_path / "gpu.json").exists()
