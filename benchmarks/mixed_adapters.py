"""Time per token of a batch whose samples use different ESFT adapters (peft's ``adapter_names=``), against one
adapter for the whole batch and against the merged model.

    python benchmarks/mixed_adapters.py [--model demo deepseek_v2] [--mode generate decode forward] [--adapters 1 2 4 8]
                                        [--batch 8 --prompt 16 --new-tokens 16 --experts-per-adapter 6]
                                        [--rounds 5] [--threads 1 --clock cpu] [--device cuda --dtype bfloat16]
                                        [--json OUT]

Models: ``demo`` is the demo's base (``esft_peft.demo``: DeepSeek-V2-shaped, 64 routed experts top-6, 2 shared,
hidden 64, 3 layers, the first dense), ``deepseek_v2`` a wider DeepSeek-V2-shaped stack sized for CPU (64 routed
experts top-6, 2 shared, hidden 256, expert width 128, 4 layers, the first dense; ``--hidden``/``--moe-inner``/
``--layers`` change it). Eight ESFT adapters are added to one base (``init_weights=False``: random deltas, so every
adapter computes something different), each training ``--experts-per-adapter`` experts per MoE layer (a seeded
random choice per adapter: 6 of 64 is the paper's 5-15%).

Cases, in interleaved rounds (median; every case runs once per round so that machine noise hits all alike, each
round starting one case later so that no case always runs right after another model's weights went through the
caches):
"merged" is one adapter merged into a copy of the base (``merge_and_unload``: the base's own cost); "one adapter"
runs the whole batch with one active adapter; "N mixed" passes ``adapter_names`` with the batch's samples spread
round-robin over N adapters. ``generate`` is greedy ``model.generate`` of exactly ``--new-tokens`` tokens after a
``--prompt``-token prompt (the prefill included), ``decode`` the same without the prefill and first token (the time
of a 1-token generate, run in the same round, subtracted), ``forward`` one forward over the batch's prompts (a
prefill). ``--clock cpu`` times the process's CPU time instead of the wall clock: on a CPU machine shared with other
work, with ``--threads 1``, it does not count the time other processes hold the core (cache and memory-bandwidth
contention still count). Time per token is the case's time divided by the tokens it produced (batch x new tokens;
batch x (new tokens - 1) for ``decode``; batch x prompt for ``forward``). The ratio is N mixed / one adapter.
``--design`` picks how mixed batches run: ``both`` (default) times each N with the per-group design (one MoE-block
call per adapter group) and the grouped one (one experts call for all adapters' pairs, see
``esft_peft.tuners.esft.mixed_experts``).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from esft_peft import ESFTConfig, find_moe_layers
from esft_peft.tuners.esft.mixed_experts import grouped_experts

DESIGNS = {"per-group": False, "grouped": True}


def build_base(args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The seeded base model ``name`` (every call builds the same weights)."""
    if name == "demo":
        from esft_peft.demo.settings import load_settings
        from esft_peft.demo.training import build_model

        model = build_model(load_settings("full"), seed=0)
    else:
        config = AutoConfig.for_model(
            "deepseek_v2", vocab_size=2048, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            moe_intermediate_size=args.moe_inner, num_hidden_layers=args.layers, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
            first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
            v_head_dim=32, topk_method="greedy", n_group=1, topk_group=1,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def with_adapters(base: torch.nn.Module, count: int, per_adapter: int) -> torch.nn.Module:
    """``base`` with ``count`` ESFT adapters ``a0``, ``a1``, ... (random deltas on seeded random experts)."""
    layers = {key: layer.num_experts for key, layer in find_moe_layers(base).items()}
    model = None
    for index in range(count):
        rng = random.Random(index)
        experts = {key: sorted(rng.sample(range(total), per_adapter)) for key, total in layers.items()}
        config = ESFTConfig(experts=experts, init_weights=False, inference_mode=True)
        torch.manual_seed(100 + index)
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"a{index}")
        else:
            model.add_adapter(f"a{index}", config)
    model.set_adapter("a0")
    return model.eval()


def bench_model(args: argparse.Namespace, name: str, mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model = with_adapters(build_base(args, name, device, dtype), max(args.adapters), args.experts_per_adapter)
    merged = copy.deepcopy(model).merge_and_unload()
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    produced = args.batch * {"generate": args.new_tokens, "decode": args.new_tokens - 1, "forward": args.prompt}[mode]

    def run(target: torch.nn.Module, **kwargs) -> Callable[[], torch.Tensor]:
        def generate(tokens: int) -> torch.Tensor:
            return target.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens,
                                   min_new_tokens=tokens, do_sample=False, **kwargs)

        def call() -> torch.Tensor:
            with torch.no_grad():
                if mode == "forward":
                    return target(input_ids=input_ids, attention_mask=mask, **kwargs).logits
                if mode == "decode":  # the prefill and first token, timed apart and subtracted below
                    synchronize(device)
                    start = clock()
                    generate(1)
                    synchronize(device)
                    prefills.append(clock() - start)
                return generate(args.new_tokens)

        return call

    def designed(call: Callable[[], torch.Tensor], grouped: bool) -> Callable[[], torch.Tensor]:
        def wrapped() -> torch.Tensor:
            with grouped_experts(grouped):
                return call()

        return wrapped

    cases: dict[str, Callable[[], torch.Tensor]] = {"merged": run(merged), "one adapter": run(model)}
    designs = list(DESIGNS) if args.design == "both" else [args.design]
    for count in args.adapters:
        names = [f"a{i % count}" for i in range(args.batch)]
        for design in designs:
            label = f"{count} mixed" + (f" ({design})" if len(designs) > 1 else "")
            cases[label] = designed(run(model, adapter_names=names), DESIGNS[design])
    prefills: list[float] = []
    outputs = {label: call() for label, call in cases.items()}  # warm-up, outside the timed rounds
    times: dict[str, list[float]] = {label: [] for label in cases}
    labels = list(cases)
    for round_ in range(args.rounds):
        shift = round_ % len(labels)  # each round starts one case later: no case always follows the merged copy
        for label in labels[shift:] + labels[:shift]:
            prefills.clear()
            synchronize(device)
            start = clock()
            cases[label]()
            synchronize(device)
            times[label].append(clock() - start - 2 * sum(prefills))
    one = statistics.median(times["one adapter"])
    results = {}
    for label, samples in times.items():
        seconds = statistics.median(samples)
        results[label] = {"ms_per_token": 1000 * seconds / produced, "x_one_adapter": seconds / one}
    if mode != "forward":  # every mixed design generates the same tokens
        mixed = [label for label in cases if "mixed" in label and label.startswith(f"{max(args.adapters)} ")]
        assert all(torch.equal(outputs[mixed[0]], outputs[label]) for label in mixed), "designs disagree"
    print(f"\n{name}, {mode}: batch {args.batch}, prompt {args.prompt}"
          + (f", {args.new_tokens} new tokens" if mode != "forward" else "")
          + f", {args.experts_per_adapter} experts per adapter per MoE layer, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {device}, {args.clock} clock, median of {args.rounds} rounds")
    print("| case | ms / token | x one adapter |\n| --- | --- | --- |")
    for label, r in results.items():
        print(f"| {label} | {r['ms_per_token']:.3f} | {r['x_one_adapter']:.2f}x |")
    return {"model": name, "mode": mode, "cases": results}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["demo", "deepseek_v2"], choices=("demo", "deepseek_v2"))
    parser.add_argument("--mode", nargs="+", default=["generate"], choices=("generate", "decode", "forward"))
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8], help="adapters mixed in a batch")
    parser.add_argument("--design", default="both", choices=("both", *DESIGNS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per sample")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--experts-per-adapter", type=int, default=6, help="experts trained per MoE layer")
    parser.add_argument("--hidden", type=int, default=256, help="deepseek_v2 stack: hidden size")
    parser.add_argument("--moe-inner", type=int, default=128, help="deepseek_v2 stack: expert width")
    parser.add_argument("--layers", type=int, default=4, help="deepseek_v2 stack: layers (the first dense)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: the process's CPU time (steadier on a shared CPU machine, with --threads 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures to OUT (JSON)")
    args = parser.parse_args(argv)
    if args.batch < max(args.adapters):
        parser.error(f"--batch {args.batch} cannot hold {max(args.adapters)} adapters: give a batch at least as large")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    runs = [bench_model(args, name, mode, device, dtype) for name in args.model for mode in args.mode]
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"setup": setup, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
