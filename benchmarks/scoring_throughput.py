"""Throughput of ``score_experts`` against a plain ``no_grad`` forward over the same token batches.

Prints one table row per model: tokens/s of both and their ratio (goal: >= 0.9). Each timing is the best of
``--repeats`` runs after a warm-up pass, plain and scoring runs alternating. Models are random, built from
configs (no download).

    python benchmarks/scoring_throughput.py
    python benchmarks/scoring_throughput.py --models deepseek_v2 --hidden 2048 --moe-intermediate 1408 \
        --device cuda --dtype bfloat16 --seq-len 1024 --json OUT     # DeepSeek-V2-Lite widths, 4 layers

``deepseek_v2`` (64 routed + 2 shared experts, top-6) is not in the default set. ``--hidden``/``--moe-intermediate``
override every model's widths; ``--json OUT`` also writes the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from esft_peft import score_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BASE = dict(vocab_size=4096, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
            num_hidden_layers=4, tie_word_embeddings=False)
MODELS = {
    "qwen3_moe": dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, intermediate_size=512,
                      decoder_sparse_step=1, head_dim=32),
    "llama4_text": dict(num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, intermediate_size=256,
                        intermediate_size_mlp=512, head_dim=32, attention_chunk_size=256),
    "modulelist": {},
    "deepseek_v2": dict(n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=128,
                        intermediate_size=512, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=None,
                        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, topk_method="greedy", n_group=1,
                        topk_group=1),
}
DEFAULT_MODELS = ["qwen3_moe", "llama4_text", "modulelist"]


def build(name: str, widths: dict) -> torch.nn.Module:
    """Model ``name`` with ``widths`` (hidden_size, moe_intermediate_size, num_hidden_layers) over the defaults."""
    torch.manual_seed(0)
    if name == "modulelist":
        from modulelist_moe import ModuleListMoeConfig, ModuleListMoeForCausalLM

        shapes = {**dict(hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4), **widths}
        config = ModuleListMoeConfig(vocab_size=4096, n_routed_experts=32, num_experts_per_tok=4, **shapes)
        return ModuleListMoeForCausalLM(config).eval()
    shapes = {**BASE, **MODELS[name], **widths}
    if name == "llama4_text" and "moe_intermediate_size" in widths:  # llama4 names its expert width intermediate_size
        shapes["intermediate_size"] = shapes.pop("moe_intermediate_size")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **shapes)).eval()


def best_times(runs: list, repeats: int) -> list[float]:
    """Best wall time of each run; the runs alternate so that both see the same machine load."""
    for run in runs:
        run()  # warm-up
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, help="hidden_size of every model (default: 256)")
    parser.add_argument("--moe-intermediate", type=int, help="expert width of every model (default: per model)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures to OUT (JSON)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    widths = {key: value for key, value in (("hidden_size", args.hidden), ("moe_intermediate_size",
              args.moe_intermediate), ("num_hidden_layers", args.layers)) if value is not None}
    if args.hidden is not None:
        widths["num_attention_heads"] = widths["num_key_value_heads"] = max(1, args.hidden // 128)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 4096, (args.batch_size, args.seq_len), generator=g).to(device),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=device)}
               for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.batches} batches of "
          f"{args.batch_size} x {args.seq_len} tokens ({tokens} tokens), best of {args.repeats}")
    print("| model | plain forward (tok/s) | score_experts (tok/s) | ratio |\n|---|---|---|---|")
    rows = {}
    for name in args.models:
        model = build(name, widths).to(device=device, dtype=getattr(torch, args.dtype))
        use_cache = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

        def plain() -> None:
            with torch.no_grad():
                for batch in batches:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **use_cache)
            synchronize(device)

        def scoring() -> None:
            score_experts(model, batches, token_budget=None, batch_size=args.batch_size, max_length=args.seq_len,
                          show_progress=False)
            synchronize(device)

        base, scored = best_times([plain, scoring], args.repeats)
        print(f"| {name} | {tokens / base:,.0f} | {tokens / scored:,.0f} | {base / scored:.3f} |", flush=True)
        rows[name] = {"plain_tok_s": tokens / base, "scoring_tok_s": tokens / scored, "ratio": base / scored}
        del model
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"setup": {**setup, "tokens": tokens}, "models": rows}, indent=2))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
