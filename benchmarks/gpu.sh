#!/usr/bin/env bash
# The GPU run: layer, whole-model, PESC and scoring benchmarks on CUDA at realistic shapes, one results file.
#
#   bash benchmarks/gpu.sh results/gpu.json        # CUDA, bf16, DeepSeek-V2-Lite / 7B-like shapes
#   bash benchmarks/gpu.sh --cpu-smoke OUTDIR      # tiny shapes, fp32, CPU: checks the pipeline in seconds
#   bash benchmarks/gpu.sh results/layer.json --only layer   # some sections: layer whole_model pesc scoring
#
# OUT ending in .json is the results file; otherwise it is a folder that receives gpu.json (cpu-smoke.json).
# The shapes and options of every section are in benchmarks/gpu_run.py. PYTHON picks the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$root/benchmarks/gpu_run.py" "$@"
