"""Forward+backward time of one ESFT-wrapped experts layer against the frozen base layer.

    python benchmarks/layer_overhead.py [--experts 64 --top-k 6 --selected 4 --hidden 512 --inner 256 --tokens 256]

A Qwen3-MoE experts layer (fp32, CPU unless CUDA is available). "frozen" is the base layer with only the input
requiring grad (the cost every method pays); "esft" wraps it with deltas for ``--selected`` experts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import esft_peft  # noqa: F401  (registers ESFT)
from esft_peft import ESFTConfig


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--selected", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=64, hidden_size=args.hidden, moe_intermediate_size=args.inner, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, head_dim=args.hidden // 4, num_experts=args.experts,
        num_experts_per_tok=args.top_k, intermediate_size=args.inner,
    )
    model = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    logits = torch.randn(args.tokens, args.experts)
    weights, index = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
    base_layer = model.model.layers[0].mlp.experts
    print(f"experts layer: E={args.experts}, top-{args.top_k}, H={args.hidden}, I={args.inner}, "
          f"{args.tokens} tokens, {args.selected} selected experts")
    print("| implementation | frozen base fwd+bwd (ms) | ESFT fwd+bwd (ms) | ratio |")
    print("| --- | --- | --- | --- |")
    frozen = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        frozen[implementation] = median_ms(lambda: base_layer(hidden, index, weights).sum().backward(), args.repeats)
    # the most-used experts: the costliest selection of that size (task-relevant experts are the busy ones)
    ids = torch.topk(torch.bincount(index.flatten(), minlength=args.experts).float(), args.selected).indices
    peft_model = get_peft_model(model, ESFTConfig(experts={0: sorted(ids.tolist())}))
    wrapped = peft_model.get_base_model().model.layers[0].mlp.experts
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        peft_model.get_base_model().set_experts_implementation(implementation)
        esft = median_ms(lambda: wrapped(hidden, index, weights).sum().backward(), args.repeats)
        print(f"| {implementation} | {frozen[implementation]:.2f} | {esft:.2f} | {esft / frozen[implementation]:.2f}x |")


if __name__ == "__main__":
    main()
