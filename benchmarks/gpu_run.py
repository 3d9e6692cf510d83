"""Driver of ``benchmarks/gpu.sh``: runs the four benchmark scripts with the GPU run's shapes, merges their JSON.

    python benchmarks/gpu_run.py OUT [--cpu-smoke] [--only layer pesc ...]

Sections (each the named script's ``main`` with the arguments in ``SECTIONS``, in this process):

- ``layer``: layer_overhead.py, a DeepSeek-V2-Lite experts layer (64 experts, top-6, H=2048, I=1408, bf16) at 4096
  and 16384 tokens: frozen, full FT, ESFT at 25% of the routed pairs and ESFT with 64/64 experts.
- ``whole_model``: compare_methods.py, a 4-layer DeepSeek-V2-Lite-shaped model at real widths, one training step:
  frozen floors, ESFT (6/64 and 64/64), full FT, LoRA; time and ``torch.cuda.max_memory_allocated``.
- ``pesc``: pesc_layer.py, a 7B-like llama MLP (H=4096, I=11008), 8 experts top-2, adapters of 64 and 512.
- ``scoring``: scoring_throughput.py, ``score_experts`` against a plain forward, tokens/s.
- ``quantized`` / ``quantized_r8``: quantized_memory.py, a 6-layer DeepSeek-V2-Lite-shaped model at real widths
  loaded on the GPU: 4-bit (nf4) base against bf16 base, ESFT 6/64 experts with full-rank fp32 deltas / rank-8
  deltas; allocator peak and step time. ``quantized_recipe``: 3 layers loaded and wrapped on the CPU, then moved
  (docs/training.md's recipe): the load peak. ``quantized_gc`` / ``quantized_gc_r8``: 12 layers, gradient
  checkpointing, one sequence of 2048 tokens (a long-context fine-tuning step, where the weights dominate).
- ``ep``: ep_memory.py at ep = 1 (one GPU), DeepSeek-V2-Lite widths: bytes held and the allocator's peak.

The results file: ``{"mode", "device", "versions", "started", "seconds", "commands": {section: argv},
"sections": {section: that script's --json output}}``; a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

QUANTIZED = [  # quantized_memory.py at DeepSeek-V2-Lite widths
    "--experts", "64", "--top-k", "6", "--selected", "6", "--hidden", "2048", "--inner", "1408",
    "--intermediate", "10944", "--heads", "16", "--attention", "lite", "--vocab", "102400", "--batch", "4",
    "--seq", "1024", "--steps", "3", "--device", "cuda"]
QUANTIZED_SMOKE = [
    "--layers", "2", "--experts", "8", "--top-k", "2", "--selected", "1", "--hidden", "64", "--inner", "32",
    "--batch", "1", "--seq", "16", "--steps", "1"]

GPU = {
    "layer": ("layer_overhead", [
        "--family", "deepseek_v2", "--experts", "64", "--top-k", "6", "--hidden", "2048", "--inner", "1408",
        "--tokens", "4096", "16384", "--share", "0.25", "--all-experts", "--rounds", "10",
        "--device", "cuda", "--dtype", "bfloat16"]),
    "whole_model": ("compare_methods", [
        "--layers", "4", "--hidden", "2048", "--intermediate", "10944", "--moe-intermediate", "1408",
        "--attention", "lite", "--vocab", "32000", "--batch-size", "4", "--seq-len", "1024", "--steps", "10",
        "--esft-experts", "6", "64", "--no-save", "--device", "cuda", "--dtype", "bfloat16"]),
    "pesc": ("pesc_layer", [
        "--hidden", "4096", "--intermediate", "11008", "--tokens", "4096", "--experts", "8", "--top-k", "2",
        "--adapter-dim", "64", "512", "--rounds", "10", "--device", "cuda", "--dtype", "bfloat16"]),
    "scoring": ("scoring_throughput", [
        "--models", "deepseek_v2", "qwen3_moe", "--hidden", "2048", "--moe-intermediate", "1408", "--layers", "4",
        "--batches", "4", "--batch-size", "8", "--seq-len", "1024", "--repeats", "3",
        "--device", "cuda", "--dtype", "bfloat16"]),
    "quantized": ("quantized_memory", [*QUANTIZED, "--layers", "6", "--load", "cuda"]),
    "quantized_r8": ("quantized_memory", [*QUANTIZED, "--layers", "6", "--load", "cuda", "--delta-rank", "8"]),
    "quantized_recipe": ("quantized_memory", [*QUANTIZED, "--layers", "3", "--load", "cpu", "--delta-rank", "8"]),
    "quantized_gc": ("quantized_memory", [*QUANTIZED, "--layers", "12", "--load", "cuda", "--gradient-checkpointing",
                                          "--batch", "1", "--seq", "2048"]),
    "quantized_gc_r8": ("quantized_memory", [*QUANTIZED, "--layers", "12", "--load", "cuda", "--gradient-checkpointing",
                                             "--batch", "1", "--seq", "2048", "--delta-rank", "8"]),
    "ep": ("ep_memory", ["--ep", "1", "--preset", "lite", "--device", "cuda"]),
}
CPU_SMOKE = {
    "layer": ("layer_overhead", [
        "--family", "deepseek_v2", "--experts", "8", "--top-k", "2", "--hidden", "32", "--inner", "16",
        "--tokens", "64", "128", "--share", "0.25", "--all-experts", "--rounds", "2", "--device", "cpu"]),
    "whole_model": ("compare_methods", [
        "--layers", "2", "--hidden", "64", "--intermediate", "96", "--moe-intermediate", "16", "--vocab", "128",
        "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--esft-experts", "6", "64", "--no-save",
        "--in-process", "--device", "cpu"]),
    "pesc": ("pesc_layer", [
        "--hidden", "64", "--intermediate", "128", "--tokens", "64", "--experts", "4", "--top-k", "2",
        "--adapter-dim", "8", "16", "--rounds", "2", "--device", "cpu"]),
    "scoring": ("scoring_throughput", [
        "--models", "deepseek_v2", "qwen3_moe", "--hidden", "64", "--moe-intermediate", "16", "--layers", "2",
        "--batches", "1", "--batch-size", "2", "--seq-len", "16", "--repeats", "1", "--device", "cpu"]),
    "quantized": ("quantized_memory", QUANTIZED_SMOKE),
    "quantized_r8": ("quantized_memory", [*QUANTIZED_SMOKE, "--delta-rank", "8"]),
    "quantized_recipe": ("quantized_memory", [*QUANTIZED_SMOKE, "--delta-rank", "8"]),
    "quantized_gc": ("quantized_memory", [*QUANTIZED_SMOKE, "--gradient-checkpointing"]),
    "quantized_gc_r8": ("quantized_memory", [*QUANTIZED_SMOKE, "--gradient-checkpointing", "--delta-rank", "8"]),
    "ep": ("ep_memory", ["--ep", "1"]),
}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versions() -> dict[str, str]:
    import peft
    import transformers

    import esft_peft

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "esft_peft": esft_peft.__version__, "python": sys.version.split()[0]}


def summary(results: dict) -> str:
    sections, lines = results["sections"], [f"GPU run ({results['mode']}) on {results['device']}"]
    for run in sections.get("layer", {}).get("runs", []):
        cases = run["cases"]
        share = next(name for name in cases if name.startswith("ESFT") and name != "ESFT all")
        peaks = ", ".join(f"{name} {case['step_peak_mib']:.0f} MiB" for name, case in cases.items()
                          if "step_peak_mib" in case)
        lines.append(f"layer, {run['tokens']} tokens: frozen {cases['frozen']['ms']:.2f} ms, {share} "
                     f"{cases[share]['x_frozen']:.2f}x frozen, ESFT all {cases['ESFT all']['x_full_ft']:.2f}x full FT; "
                     f"saved for backward {share} {cases[share]['saved_mib']:.3g} MiB vs frozen "
                     f"{cases['frozen']['saved_mib']:.3g} MiB" + (f"; step peak: {peaks}" if peaks else ""))
    if "whole_model" in sections:
        lines.append("whole model step: " + ", ".join(
            f"{name} {r['step_s']:.3f} s" + (f" / {r['peak_mib']:.0f} MiB" if "peak_mib" in r else "")
            for name, r in sections["whole_model"]["methods"].items()))
    if "pesc" in sections:
        runs = sections["pesc"]["runs"]
        lines.append("PESC layer: " + ", ".join(
            f"E={r['experts']} d={r['adapter_dim']} {r['pesc_x_frozen']:.2f}x frozen" for r in runs))
    if "scoring" in sections:
        lines.append("scoring: " + ", ".join(f"{name} {r['scoring_tok_s']:,.0f} tok/s ({r['ratio']:.2f}x plain)"
                                             for name, r in sections["scoring"]["models"].items()))
    for section in ("quantized", "quantized_r8", "quantized_recipe", "quantized_gc", "quantized_gc_r8"):
        if section in sections:
            r = sections[section]
            load = f"; load peak {r['nf4']['load_peak_mib']:.0f} MiB" if "load_peak_mib" in r["nf4"] else ""
            lines.append(f"{section}: peak {r['nf4']['peak_mib']:.0f} / {r['bf16']['peak_mib']:.0f} MiB = "
                         f"{r['peak_ratio']:.3f}x, step time {r['step_time_ratio']:.2f}x "
                         f"({r['nf4']['step_s'] * 1000:.0f} / {r['bf16']['step_s'] * 1000:.0f} ms){load}")
    if "ep" in sections:
        lines.extend(f"ep {r['ep']} rank {r['rank']}: routed experts {r['routed_expert_bytes'] / 2**20:.1f} MiB"
                     + (f", CUDA peak {r['cuda_peak_bytes'] / 2**20:.0f} MiB" if "cuda_peak_bytes" in r else "")
                     for r in sections["ep"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="results file (.json) or a folder for it")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, fp32, on CPU (checks the pipeline)")
    parser.add_argument("--only", nargs="+", choices=tuple(GPU), help="run only these sections")
    args = parser.parse_args(argv)
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu.sh: no CUDA device is visible to torch; run on a GPU machine, or pass --cpu-smoke "
                         "OUTDIR to check the pipeline on CPU at tiny shapes.")
    out = args.out if args.out.suffix == ".json" else args.out / f"{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    device = torch.cuda.get_device_name(0) if mode == "gpu" else "cpu"
    results = {"mode": mode, "device": device, "versions": versions(),
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commands": {}, "sections": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as parts:
        for section, (script, options) in plan.items():
            if args.only and section not in args.only:
                continue
            part = Path(parts) / f"{section}.json"
            argv_ = [*options, "--json", str(part)]
            results["commands"][section] = ["python", f"benchmarks/{script}.py", *options]
            print(f"\n== {section}: python benchmarks/{script}.py {' '.join(options)}", flush=True)
            load_script(script).main(argv_)
            results["sections"][section] = json.loads(part.read_text())
            gc.collect()
            if mode == "gpu":
                torch.cuda.empty_cache()
    results["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=2, allow_nan=False))
    print(f"\n{summary(results)}\nresults: {out}")


if __name__ == "__main__":
    main()
