"""Training cost of ESFT against the frozen-base floor, full fine-tuning and LoRA on the same MoE and data.

    python benchmarks/compare_methods.py [--layers 4 --steps 20 --device cpu] [--esft-experts 6]
    python benchmarks/compare_methods.py --esft-experts 1 3 6 12 24 64   # ESFT cost against the selection size
    python benchmarks/compare_methods.py --device cuda --dtype bfloat16 --hidden 2048 --intermediate 10944 \
        --moe-intermediate 1408 --attention lite --vocab 32000 --seq-len 1024 --no-save --json OUT

The model is DeepSeek-V2-Lite-shaped (64 routed + 2 shared experts, top-6, first layer dense) scaled down to run
on CPU. Each method runs in its own subprocess so that its peak memory is its own: on CPU the peak RSS, in total
and above the process's RSS before the model was built (the Python/torch libraries, the same for every method);
on CUDA ``torch.cuda.max_memory_allocated``. Two floors: "floor" freezes everything and back-propagates to the
embeddings; "floor_moe" back-propagates only down to the first MoE layer, where ESFT's backward stops too. ESFT trains 6 of 64 experts per MoE layer (9%, paper-like), chosen
by token scores on the benchmark data (the most-used experts, the costliest choice of that size);
``--esft-experts`` runs ESFT once per listed size. The widths (``--hidden``, ``--intermediate``,
``--moe-intermediate``, ``--vocab``), the batch (``--batch-size`` x ``--seq-len`` tokens) and ``--dtype`` are
options; ``--no-save`` skips saving and merging (slow at real widths); ``--json OUT`` also writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("floor", "floor_moe", "esft", "fft", "lora")
ATTENTION = {  # MLA widths: scaled down, or DeepSeek-V2-Lite's
    "small": dict(kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
    "lite": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
}


def build_model(args: argparse.Namespace, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "deepseek_v2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
        num_attention_heads=max(4, args.hidden // 128), num_key_value_heads=max(4, args.hidden // 128),
        n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=None, topk_method="greedy",
        n_group=1, topk_group=1, **ATTENTION[args.attention],
    )
    torch.manual_seed(0)
    with device:  # initialised where it runs (fast on a GPU)
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_method(method: str, args: argparse.Namespace, device: torch.device, esft_experts: int) -> dict:
    from peft import LoraConfig, get_peft_model

    from esft_peft import ESFTConfig, score_experts

    baseline_rss = current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args, device)
    shape = (args.batch_size, args.seq_len)
    ids = torch.randint(0, args.vocab, shape, generator=torch.Generator().manual_seed(1)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    share = None
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif method == "floor_moe":  # the backward starts where ESFT's does: at the first MoE layer
        model.requires_grad_(False)
        model.model.layers[model.config.first_k_dense_replace].register_forward_pre_hook(_leaf_input, with_kwargs=True)
    elif method == "esft":
        scores = score_experts(model, [batch], show_progress=False)
        experts = scores.select(score_function="token", top_k=esft_experts)
        model = get_peft_model(model, ESFTConfig(experts=experts))
        pairs = [sum(scores.expert_counts[layer][e] for e in ids) / sum(scores.expert_counts[layer])
                 for layer, ids in experts.items()]
        share = sum(pairs) / len(pairs)
    elif method == "lora":
        config = LoraConfig(r=8, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if method.startswith("floor") else torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95),
                                                                           weight_decay=0.1)
    times = []
    for _ in range(args.steps + 2):
        synchronize(device)
        start = time.perf_counter()
        model(**batch, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    result = {
        "share": share,
        "trainable": sum(p.numel() for p in params) if not method.startswith("floor") else 0,
        "step_s": statistics.median(times[2:]),
        "optimizer_bytes": sum(t.numel() * t.element_size() for s in (optimizer.state.values() if optimizer else [])
                               for t in s.values() if torch.is_tensor(t)),
    }
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    elif not args.in_process:  # a process's peak RSS is its own only in a process of its own
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(peak_rss_mib=peak_rss, peak_mib=peak_rss - baseline_rss)
    with tempfile.TemporaryDirectory() as out:
        if method in ("esft", "lora", "fft") and not args.no_save:
            model.save_pretrained(out)
            result["disk_bytes"] = directory_bytes(Path(out))
        if method in ("esft", "lora") and not args.no_save:
            start = time.perf_counter()
            model.merge_and_unload()
            result["merge_s"] = time.perf_counter() - start
    return result


def _leaf_input(module, args: tuple, kwargs: dict):
    """Make a decoder layer's hidden-state input a leaf that requires grad: backward stops there."""
    if args:
        return (args[0].detach().requires_grad_(), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (after 2 warm-up steps)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--esft-experts", type=int, nargs="+", default=[6], metavar="K",
                        help="experts trained per MoE layer by ESFT, one run per value (default: 6 of 64)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--hidden", type=int, default=256, help="hidden_size (DeepSeek-V2-Lite: 2048)")
    parser.add_argument("--intermediate", type=int, default=768, help="dense MLP width (DeepSeek-V2-Lite: 10944)")
    parser.add_argument("--moe-intermediate", type=int, default=128, help="expert width (DeepSeek-V2-Lite: 1408)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--attention", choices=tuple(ATTENTION), default="small", help="MLA widths (lite: V2-Lite's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-save", action="store_true", help="skip save_pretrained and merge_and_unload")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures to OUT (JSON)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the methods one after another in this process (faster; on CPU no memory figure)")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        result = run_method(args.method, args, torch.device(args.device), args.esft_experts[0])
        print(json.dumps(result))
        return
    passed = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
              ("layers", "steps", "device", "dtype", "hidden", "intermediate", "moe_intermediate", "vocab",
               "attention", "batch_size", "seq_len")] + (["--no-save"] if args.no_save else [])
    results = {}
    runs = [("floor", 0), ("floor_moe", 0), *(("esft", k) for k in args.esft_experts), ("fft", 0), ("lora", 0)]
    for method, experts in runs:
        name = f"esft ({experts}/64)" if method == "esft" else method
        if args.in_process:
            results[name] = run_method(method, args, torch.device(args.device), experts)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        done = subprocess.run([sys.executable, __file__, "--method", method, *passed, "--esft-experts", str(experts)],
                              capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(markdown_table(results))
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k not in ("json", "method")}
        args.json.write_text(json.dumps({"setup": setup, "methods": results}, indent=2))


def markdown_table(results: dict[str, dict]) -> str:
    floor, floor_moe, fft = results["floor"], results["floor_moe"], results["fft"]
    cpu = "peak_rss_mib" in fft
    memory = "peak RSS (MiB) | above baseline (MiB)" if cpu else "max allocated (MiB)"
    if "peak_mib" not in fft:
        memory = "memory (not measured: --in-process on CPU)"
    rows = [
        f"| method | share of routed pairs | trainable params | step (s) | x floor | x floor from MoE | x FFT | "
        f"{memory} | x FFT | optimizer state (MiB) | saved (MiB) | x FFT | merge (s) |",
        "| --- " * (14 if cpu else 13) + "|",
    ]
    for method, r in results.items():
        disk = r.get("disk_bytes")
        saved = "" if disk is None else f"{disk / 2**20:.1f}"
        saved_ratio = "" if disk is None else f"{disk / fft['disk_bytes']:.3f}"
        # --in-process on CPU: no per-method memory figure
        peak = (f"{r['peak_rss_mib']:.0f} | " if cpu else "") + (f"{r['peak_mib']:.0f}" if "peak_mib" in r else "n/a")
        peak_ratio = f"{r['peak_mib'] / fft['peak_mib']:.2f}" if "peak_mib" in r else "n/a"
        merge = f"{r['merge_s']:.2f}" if "merge_s" in r else ""
        share = "" if r.get("share") is None else f"{r['share']:.1%}"
        rows.append(
            f"| {method} | {share} | {r['trainable']:,} | {r['step_s']:.3f} | {r['step_s'] / floor['step_s']:.2f} | "
            f"{r['step_s'] / floor_moe['step_s']:.2f} | {r['step_s'] / fft['step_s']:.2f} | {peak} | {peak_ratio} | "
            f"{r['optimizer_bytes'] / 2**20:.1f} | {saved} | {saved_ratio} | {merge} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
