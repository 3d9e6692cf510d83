"""Throughput of ``score_experts`` against a plain ``no_grad`` forward over the same token batches.

Prints one table row per model: tokens/s of both and their ratio (goal: >= 0.9). Each timing is the best of
``--repeats`` runs after a warm-up pass, plain and scoring runs alternating. Models are random, built from
configs (no download).

    python benchmarks/scoring_throughput.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from esft_peft.scoring import score_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BASE = dict(vocab_size=4096, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
            num_hidden_layers=4, tie_word_embeddings=False)
MODELS = {
    "qwen3_moe": dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, intermediate_size=512,
                      decoder_sparse_step=1, head_dim=32),
    "llama4_text": dict(num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, intermediate_size=256,
                        intermediate_size_mlp=512, head_dim=32, attention_chunk_size=256),
    "modulelist": {},
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "modulelist":
        from modulelist_moe import ModuleListMoeConfig, ModuleListMoeForCausalLM

        config = ModuleListMoeConfig(vocab_size=4096, hidden_size=256, moe_intermediate_size=128, n_routed_experts=32,
                                     num_experts_per_tok=4, num_hidden_layers=4)
        return ModuleListMoeForCausalLM(config).eval()
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **{**BASE, **MODELS[name]})).eval()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 4096, (args.batch_size, args.seq_len), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
               for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.batches} batches of "
          f"{args.batch_size} x {args.seq_len} tokens ({tokens} tokens), best of {args.repeats}")
    print("| model | plain forward (tok/s) | score_experts (tok/s) | ratio |\n|---|---|---|---|")
    for name in args.models:
        model = build(name)
        use_cache = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

        def plain() -> None:
            with torch.no_grad():
                for batch in batches:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **use_cache)

        def scoring() -> None:
            score_experts(model, batches, token_budget=None, batch_size=args.batch_size, max_length=args.seq_len,
                          show_progress=False)

        base, scored = best_times([plain, scoring], args.repeats)
        print(f"| {name} | {tokens / base:,.0f} | {tokens / scored:,.0f} | {base / scored:.3f} |", flush=True)


if __name__ == "__main__":
    main()
