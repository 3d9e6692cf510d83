"""Forward+backward time of one ESFT-wrapped experts layer against the frozen layer and full fine-tuning.

    python benchmarks/layer_overhead.py [--share 0.25 --all-experts] [--experts 64 --top-k 6 --hidden 512 --inner 256
                                        --tokens 512 [4096 ...]] [--family deepseek_v2] [--device cuda --dtype bfloat16]
                                        [--delta-rank R] [--json OUT]

A Qwen3-MoE experts layer (``--family deepseek_v2``: DeepSeek-V2's, the same computation). "frozen" is the base
layer with only its input requiring grad (the backward every method pays); "full FT" also computes the gradients of
every expert weight; "ESFT" wraps it with deltas for the experts chosen as top-p selection would on a real task: the
most-used experts, until they hold ``--share`` of the routed (token, slot) pairs (routing is skewed by a random
per-expert popularity, as in trained models). ``--all-experts`` adds ESFT with all experts selected, against full
FT. Methods are timed in interleaved rounds (median), so that a noisy machine slows them alike. "floor" is what any
method that trains those pairs pays: the frozen step plus the weight gradients of the selected pairs, which full FT
computes for every pair (``frozen + share * (full FT - frozen)``, from the same run); "x floor" is a case's time over
it. Every case is built
through the public API (``get_peft_model`` with an ``ESFTConfig``) on its own copy of the same seeded model, and
called as the MoE block calls its experts module. Besides time, each case reports the bytes it saves for backward
(distinct storages, the model's weights excluded) and, on CUDA, the peak memory of one step above what was allocated
before it (``torch.cuda.max_memory_allocated``). ``--json OUT`` also writes every figure to OUT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from esft_peft import ESFTConfig


def routing(args: argparse.Namespace, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    popularity = torch.randn(args.experts, generator=generator) * args.skew
    logits = torch.randn(tokens, args.experts, generator=generator) + popularity
    weights, index = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
    return weights.to(device), index.to(device)


def select_by_share(index: torch.Tensor, experts: int, share: float) -> tuple[list[int], float]:
    counts = torch.bincount(index.flatten().cpu(), minlength=experts).float()
    order = torch.argsort(counts, descending=True, stable=True)
    cumulative = torch.cumsum(counts[order], 0) / counts.sum()
    size = int((cumulative < share).sum()) + 1
    return sorted(order[:size].tolist()), float(cumulative[size - 1])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A one-layer model of ``--family`` whose MoE block holds the benchmarked experts layer (seeded: every call
    builds the same weights)."""
    shapes = dict(vocab_size=64, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, moe_intermediate_size=args.inner, intermediate_size=args.inner,
                  num_experts_per_tok=args.top_k)
    if args.family == "deepseek_v2":
        shapes.update(n_routed_experts=args.experts, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=64,
                      q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                      topk_method="greedy", n_group=1, topk_group=1)
    else:
        shapes.update(num_experts=args.experts, head_dim=args.hidden // 4)
    torch.manual_seed(0)
    config = AutoConfig.for_model(args.family, **shapes)
    with device:  # initialised where it runs (fast on a GPU)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).requires_grad_(False)
    model.set_experts_implementation(args.implementation)
    return model


def experts_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module the first MoE block calls as ``experts(hidden, top_k_index, top_k_weights)`` (the ESFT-wrapped
    one once ``get_peft_model`` ran)."""
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, torch.nn.Module) and hasattr(module, "gate"):
            return experts
    raise RuntimeError("no MoE block with `gate` and `experts` found in the benchmark model")


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, the model's own weights excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def measure(self, run: Callable[[], None]) -> int:
        self.storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            run()
        return sum(self.storages.values())


def bench_tokens(args: argparse.Namespace, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    base_model = build_model(args, device, dtype)
    layer = experts_module(base_model)
    hidden = torch.randn(tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weights, index = routing(args, tokens, device)
    weights = weights.to(dtype)
    print(f"experts layer ({args.family}): E={args.experts}, top-{args.top_k}, H={args.hidden}, I={args.inner}, "
          f"{tokens} tokens, {args.implementation}, {args.dtype}, {torch.get_num_threads()} threads, {device}")

    def step(module: torch.nn.Module) -> None:
        module(hidden, index, weights).sum().backward()
        hidden.grad = None

    def full_ft() -> None:
        layer.requires_grad_(True)
        step(layer)
        layer.zero_grad(set_to_none=True)
        layer.requires_grad_(False)

    selections = [(f"ESFT {share:.0%}", *select_by_share(index, args.experts, share)) for share in args.share]
    if args.all_experts:
        selections.append(("ESFT all", list(range(args.experts)), 1.0))
    cases: dict[str, Callable[[], None]] = {"frozen": lambda: step(layer), "full FT": full_ft}
    models = {"frozen": base_model, "full FT": base_model}
    for name, ids, _ in selections:
        # what a user gets: get_peft_model on (a seeded copy of) the same base, only the deltas trainable
        config = ESFTConfig(experts={0: ids}, delta_rank=args.delta_rank)
        model = get_peft_model(build_model(args, device, dtype), config)
        wrapped = experts_module(model)
        deltas = [p for p in model.parameters() if p.requires_grad]
        cases[name] = (lambda module, deltas: lambda: (step(module), [setattr(d, "grad", None) for d in deltas]))(
            wrapped, deltas
        )
        models[name] = model
    for run in cases.values():  # warm-up, outside the timed rounds
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds + 1):
        for name, run in cases.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if round_ >= 1:  # one more warm-up round
                times[name].append(time.perf_counter() - start)
    rows = [("frozen", 0, 0.0), ("full FT", args.experts, 1.0)] + [(n, len(ids), s) for n, ids, s in selections]
    results = {}
    for name, count, share in rows:
        results[name] = {"experts_trained": count, "share": share, "ms": 1000 * statistics.median(times[name]),
                         "saved_mib": SavedBytes(models[name]).measure(cases[name]) / 2**20}
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            cases[name]()
            synchronize(device)
            results[name]["step_peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    frozen_ms, full_ft_ms = results["frozen"]["ms"], results["full FT"]["ms"]
    for r in results.values():
        r["x_frozen"] = r["ms"] / frozen_ms
        r["x_full_ft"] = r["ms"] / full_ft_ms
        # The method's own floor: the frozen step plus the weight gradients of the pairs it trains, which full FT
        # pays for every pair: frozen + share * (full FT - frozen), from this run's figures.
        r["floor_ms"] = frozen_ms + r["share"] * (full_ft_ms - frozen_ms)
        r["x_floor"] = r["ms"] / r["floor_ms"]
    cuda = device.type == "cuda"
    print("| case | experts trained | share of routed pairs | fwd+bwd (ms) | x frozen | x full FT | floor x frozen | "
          "x floor |" + (" saved for bwd (MiB) | step peak (MiB) |" if cuda else ""))
    print("| --- " * (10 if cuda else 8) + "|")
    for name, r in results.items():
        print(f"| {name} | {r['experts_trained']} | {r['share']:.1%} | {r['ms']:.2f} | {r['x_frozen']:.2f}x | "
              f"{r['x_full_ft']:.2f}x | {r['floor_ms'] / frozen_ms:.2f}x | {r['x_floor']:.2f}x |"
              + (f" {r['saved_mib']:.1f} | {r['step_peak_mib']:.1f} |" if cuda else ""))
    return {"tokens": tokens, "cases": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen3_moe", choices=("qwen3_moe", "deepseek_v2"))
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512], help="token counts, one table each")
    parser.add_argument("--share", type=float, nargs="+", default=[0.25], help="routed-pair shares to select")
    parser.add_argument("--all-experts", action="store_true", help="also ESFT with every expert, against full FT")
    parser.add_argument("--skew", type=float, default=1.0, help="spread of the per-expert routing popularity")
    parser.add_argument("--implementation", default="grouped_mm", choices=("grouped_mm", "eager", "batched_mm"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--delta-rank", type=int, default=None, help="low-rank deltas (ESFTConfig.delta_rank)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures to OUT (JSON)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    runs = [bench_tokens(args, tokens, device, dtype) for tokens in args.tokens]
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"setup": setup, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
