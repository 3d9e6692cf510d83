"""Forward+backward time of one ESFT-wrapped experts layer against the frozen layer and full fine-tuning.

    python benchmarks/layer_overhead.py [--share 0.25 --all-experts] [--experts 64 --top-k 6 --hidden 512 --inner 256
                                        --tokens 512] [--device cuda --dtype bfloat16]

A Qwen3-MoE experts layer. "frozen" is the base layer with only its input requiring grad (the backward every method
pays); "full FT" also computes the gradients of every expert weight; "ESFT" wraps it with deltas for the experts
chosen as top-p selection would on a real task: the most-used experts, until they hold ``--share`` of the routed
(token, slot) pairs (routing is skewed by a random per-expert popularity, as in trained models). ``--all-experts``
adds ESFT with all experts selected, against full FT. Methods are timed in interleaved rounds (median), so that a
noisy machine slows them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from esft_peft.moe.layouts.fused import FusedExperts
from esft_peft.tuners.esft.layer import ExpertsDeltaLayer


def routing(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    popularity = torch.randn(args.experts, generator=generator) * args.skew
    logits = torch.randn(args.tokens, args.experts, generator=generator) + popularity
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--share", type=float, nargs="+", default=[0.25], help="routed-pair shares to select")
    parser.add_argument("--all-experts", action="store_true", help="also ESFT with every expert, against full FT")
    parser.add_argument("--skew", type=float, default=1.0, help="spread of the per-expert routing popularity")
    parser.add_argument("--implementation", default="grouped_mm", choices=("grouped_mm", "eager", "batched_mm"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=args.hidden, moe_intermediate_size=args.inner, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, head_dim=args.hidden // 4, num_experts=args.experts,
        num_experts_per_tok=args.top_k, intermediate_size=args.inner,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).requires_grad_(False)
    model.set_experts_implementation(args.implementation)
    layer = model.model.layers[0].mlp.experts
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weights, index = routing(args, device)
    weights = weights.to(dtype)
    print(f"experts layer: E={args.experts}, top-{args.top_k}, H={args.hidden}, I={args.inner}, {args.tokens} tokens, "
          f"{args.implementation}, {args.dtype}, {torch.get_num_threads()} threads, {device}")

    def step(module: torch.nn.Module) -> None:
        module(hidden, index, weights).sum().backward()

    def full_ft() -> None:
        layer.requires_grad_(True)
        step(layer)
        layer.zero_grad(set_to_none=True)
        layer.requires_grad_(False)

    selections = [(f"ESFT {share:.0%}", *select_by_share(index, args.experts, share)) for share in args.share]
    if args.all_experts:
        selections.append(("ESFT all", list(range(args.experts)), 1.0))
    cases = {"frozen": lambda: step(layer), "full FT": full_ft}
    for name, ids, _ in selections:
        # the layer get_peft_model would create, around the same base experts (nothing of the base is copied)
        wrapped = ExpertsDeltaLayer(layer, FusedExperts(), "default", ids).requires_grad_(False)
        deltas = list(wrapped.esft_delta["default"].values())
        for delta in deltas:
            delta.requires_grad_(True)
        cases[name] = (lambda module, deltas: lambda: (step(module), [setattr(d, "grad", None) for d in deltas]))(
            wrapped, deltas
        )
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds + 2):
        for name, run in cases.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if round_ >= 2:  # warm-up rounds
                times[name].append(time.perf_counter() - start)
    median = {name: 1000 * statistics.median(values) for name, values in times.items()}
    print("| case | experts trained | share of routed pairs | fwd+bwd (ms) | x frozen | x full FT |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [("frozen", 0, 0.0), ("full FT", args.experts, 1.0)] + [(n, len(ids), s) for n, ids, s in selections]
    for name, count, share in rows:
        print(f"| {name} | {count} | {share:.1%} | {median[name]:.2f} | {median[name] / median['frozen']:.2f}x | "
              f"{median[name] / median['full FT']:.2f}x |")


if __name__ == "__main__":
    main()
