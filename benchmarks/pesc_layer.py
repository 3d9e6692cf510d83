"""Forward+backward time of one PESC layer against the frozen dense MLP and a per-expert loop as in the authors' code.

    python benchmarks/pesc_layer.py [--hidden 768 --intermediate 2048 --tokens 2048 --experts 8 16 --top-k 2]
                                    [--threads 1] [--rounds 7] [--adapter-dim 64 512] [--device cuda --dtype bfloat16]
                                    [--json OUT]

A llama MLP (gate/up/down, SiLU). "frozen" is the dense MLP with only its input requiring grad (the backward every
method pays). "PESC" is esft-peft's layer (router + adapter experts at ``adapter_dim = intermediate / 16``, grouped
matmuls over the routed pairs). "loop" computes the same layer as the authors' code does
(``CamelidaeGateAdapter.forward`` in camelidae/modeling_camelidae.py): the (token, slot) rows repeated k times, and
for every expert a boolean mask gathers its rows and ``rows[mask] += expert(inputs[mask])`` writes them back.
Methods are timed in interleaved rounds (median), so that a noisy machine slows them alike; compare the ratios of
one run. ``--adapter-dim`` (several values: one run each) overrides the default width; ``--json OUT`` also writes
the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from esft_peft import PESCConfig, PESCLayer


def crafted_layer(args: argparse.Namespace, experts: int, adapter_dim: int) -> PESCLayer:
    config = LlamaConfig(vocab_size=32, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=1, num_attention_heads=max(1, args.hidden // 64))
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), PESCConfig(
        num_experts=experts, top_k=args.top_k, adapter_dim=adapter_dim, adapter_dropout=0.0))
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    layer = next(m for m in model.modules() if isinstance(m, PESCLayer))
    with torch.no_grad():  # trained-like adapters (U is zero at creation)
        layer.pesc_up["default"].normal_(0, 0.02)
    return layer.train()


def loop_forward(layer: PESCLayer, x: torch.Tensor) -> torch.Tensor:
    """The authors' ``CamelidaeGateAdapter.forward`` over the same weights: (token, slot) rows repeated k times, then
    for every expert a boolean mask selects its rows, ``rows[mask] += expert(inputs[mask])``, and the slots are
    summed with the routing weights."""
    router, down, up = layer.pesc_router["default"], layer.pesc_down["default"], layer.pesc_up["default"]
    flat = x.reshape(-1, x.shape[-1])
    hidden = layer.get_base_layer()(flat)
    _, weights, index = router(flat)
    top_k = index.shape[-1]
    flat_index = index.view(-1)
    inputs = hidden.repeat_interleave(top_k, dim=0)
    rows = hidden.repeat_interleave(top_k, dim=0)
    for expert in range(down.shape[0]):
        rows[flat_index == expert] += F.gelu(inputs[flat_index == expert] @ down[expert].T) @ up[expert].T
    return (rows.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1).view_as(x)


def step(function, x: torch.Tensor, grad: torch.Tensor) -> float:
    synchronize(x.device)
    start = time.perf_counter()
    function(x).backward(grad)
    synchronize(x.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--adapter-dim", type=int, nargs="+", help="adapter widths (default: intermediate / 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures to OUT (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype).requires_grad_()
    grad = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # the loop sums in another order
    runs = []
    for adapter_dim in args.adapter_dim or [args.intermediate // 16]:
        print(f"llama MLP {args.hidden}->{args.intermediate}, {args.tokens} tokens, adapter_dim {adapter_dim}, "
              f"top-{args.top_k}, {args.threads} thread(s), median of {args.rounds} interleaved rounds"
              + ("" if device.type == "cpu" and dtype == torch.float32 else f", {device}, {args.dtype}"))
        runs += bench_width(args, adapter_dim, x, grad, tolerance)
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"setup": setup, "runs": runs}, indent=2))


def bench_width(args: argparse.Namespace, adapter_dim: int, x: torch.Tensor, grad: torch.Tensor,
                tolerance: float) -> list[dict]:
    runs = []
    for experts in args.experts:
        layer = crafted_layer(args, experts, adapter_dim)
        dense = layer.get_base_layer()
        with torch.no_grad():
            torch.testing.assert_close(loop_forward(layer, x), layer(x), atol=tolerance, rtol=tolerance)
        methods = {"frozen": dense, "PESC": layer, "loop": lambda inp: loop_forward(layer, inp)}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for name, function in methods.items():
            step(function, x, grad)  # warm-up
        for _ in range(args.rounds):
            for name, function in methods.items():
                times[name].append(step(function, x, grad))
        median = {name: statistics.median(values) for name, values in times.items()}
        print(f"E={experts:3d}: frozen {1000 * median['frozen']:7.1f} ms | PESC {1000 * median['PESC']:7.1f} ms "
              f"({median['PESC'] / median['frozen']:.2f}x frozen) | loop {1000 * median['loop']:7.1f} ms "
              f"(PESC {median['loop'] / median['PESC']:.2f}x faster)")
        runs.append({"experts": experts, "adapter_dim": adapter_dim, "tokens": args.tokens,
                     **{f"{name}_ms": 1000 * value for name, value in median.items()},
                     "pesc_x_frozen": median["PESC"] / median["frozen"],
                     "loop_x_pesc": median["loop"] / median["PESC"]})
    return runs


if __name__ == "__main__":
    main()
