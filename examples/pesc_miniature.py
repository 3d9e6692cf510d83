"""The PESC paper in miniature (Tables 2 and 4): dense LoRA vs PESC with 4, 8 and 16 experts, equal steps.

    python examples/pesc_miniature.py [--seeds 0 1 2] [--pretrain-steps 600] [--tune-steps 300]

A tiny dense llama is built from a config and pre-trained in-process on a mixture of "general" synthetic tasks
(copy, reverse, increment, complement). It is then instruction-tuned on a mixture of three other tasks (sort, double,
modsum) with the same steps, batches and learning rate for every method:

- "dense LoRA" (the paper's Camel): LoRA r=8 on every linear of the decoder layers;
- "PESC E=n" (Camelidae): the same LoRA part plus n adapter experts per MLP (top-2, adapter_dim 16,
  load-balancing coefficient 0.01).

Reported: exact-match accuracy on 256 held-out examples per tuned task, mean and standard deviation over seeds,
and every seed's numbers. One thread; a few minutes of CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections.abc import Iterator

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from esft_peft import PESCConfig  # importing esft_peft registers PESC with peft
from esft_peft.demo import synthetic_tasks as st
from esft_peft.demo.training import train_loop

GENERAL = {"copy": 1.0, "reverse": 1.0, "increment": 1.0, "complement": 1.0}
TUNED = {"sort": 1.0, "double": 1.0, "modsum": 1.0}
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0)


def mixture_stream(tokenizer, weights: dict[str, float], batch_size: int, seed: int, digits: int) -> Iterator[dict]:
    """Endless seeded batches drawn from a weighted mixture of the synthetic digit tasks."""
    rng = random.Random(seed)
    while True:
        yield st.mixture_batch(tokenizer, weights, batch_size, rng, length=digits)


def pretrained_base(seed: int, steps: int, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(st.vocabulary()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    train_loop(model, mixture_stream(tokenizer, GENERAL, 64, seed, 6), steps, 3e-3, desc="pre-training",
               progress=False)
    return model.eval()


def method_config(name: str):
    if name == "dense LoRA":
        return LoraConfig(target_modules="all-linear", **LORA)
    experts = int(name.split("=")[1])
    return PESCConfig(num_experts=experts, top_k=2, adapter_dim=16, adapter_dropout=0.0, router_aux_loss_coef=0.01,
                      lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])


def run(seed: int, methods: list[str], args: argparse.Namespace, tokenizer, cache: dict) -> dict[str, dict]:
    base = pretrained_base(seed, args.pretrain_steps, tokenizer)
    results = {}
    for name in methods:
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), method_config(name))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        stream = mixture_stream(tokenizer, TUNED, args.batch_size, 10_000 + seed, 6)
        start = time.perf_counter()
        losses = train_loop(model, stream, args.tune_steps, args.lr, desc=name, progress=False)
        seconds = time.perf_counter() - start
        accuracy = st.evaluate_tasks(model, tokenizer, TUNED, count=256, cache=cache)
        results[name] = {"accuracy": accuracy, "average": statistics.mean(accuracy.values()),
                         "final_loss": statistics.mean(losses[-20:]), "trainable": trainable, "seconds": seconds}
        print(f"seed {seed} {name:11s}: average {results[name]['average']:.3f} {accuracy} "
              f"({trainable:,} trainable, {seconds:.1f} s)", flush=True)
    return results


def table(runs: dict[int, dict[str, dict]], methods: list[str]) -> str:
    tasks = list(TUNED)
    lines = ["| method | trainable | average | " + " | ".join(tasks) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for name in methods:
        per_seed = [runs[seed][name] for seed in runs]
        cells = []
        for values in ([r["average"] for r in per_seed], *[[r["accuracy"][t] for r in per_seed] for t in tasks]):
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}")
        lines.append(f"| {name} | {per_seed[0]['trainable']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--tune-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = st.build_tokenizer()
    methods = ["dense LoRA", *[f"PESC E={n}" for n in args.experts]]
    cache: dict = {}
    runs = {seed: run(seed, methods, args, tokenizer, cache) for seed in args.seeds}
    print("\nexact match (%) on the tuned tasks, mean ± standard deviation over seeds "
          f"{args.seeds} ({args.tune_steps} steps of {args.batch_size} examples each):\n")
    print(table(runs, methods))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({str(seed): results for seed, results in runs.items()}, handle, indent=2)


if __name__ == "__main__":
    main()
