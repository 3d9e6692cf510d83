"""ESFT from a 4-bit base against the same base unquantized, in the paper in miniature's setting.

    python benchmarks/quantized_quality.py [--seeds 0 1 2] [--size full] [--lr 1e-3] [--json OUT]

Per seed: pre-train the miniature's fine-grained DeepSeek-V2 base (docs/paper_in_miniature.md), score the target
task and select ESFT-Token's experts (p = 0.2), then fine-tune that selection twice, with the same batches and
learning rate (1e-3, the rate the miniature's validation rule picks for ESFT-Token on every seed):

- from the base as trained (fp32, as in the miniature);
- from the base saved and loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4, fp32 compute)``: its linear
  layers are ``Linear4bit`` and ESFT holds the unselected routed experts in nf4.

Reports test accuracy on the target task and retention (mean test accuracy on the other domains), before and after
fine-tuning, per seed and as mean +- sample standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from esft_peft.demo import synthetic_tasks as st
from esft_peft.demo.methods import METHODS, prepare, select_experts
from esft_peft.demo.settings import load_settings
from esft_peft.demo.training import finetuning_stream, pretrain_base, score_domain, train_loop
from esft_peft.quiet import quiet_libraries


def load_4bit(folder: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32)
    for module in model.modules():  # bitsandbytes' CPU inference path needs in_features % 64 == 0 (not all are)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(args.size)
    target, tokenizer, cache = settings.target_domain, st.build_tokenizer(), {}

    def accuracy(model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        found = st.evaluate_domains(model, tokenizer, settings.domains, settings.eval_examples, split="test",
                                    length=settings.sequence_words, cache=cache)
        return {"target": found[target], "retention": st.retention(found, target)}

    torch.manual_seed(seed)
    base, _ = pretrain_base(settings, seed, False, progress=False)
    scores = score_domain(base, tokenizer, settings, target, seed)
    method = METHODS["ESFT-Token"]
    experts = select_experts(method, scores, seed)
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        bases = {"fp32": base, "nf4": load_4bit(folder)}
        result: dict[str, Any] = {"seed": seed, "experts": sum(len(ids) for ids in experts.values())}
        for name, model in bases.items():
            before = accuracy(model)
            tuned = prepare(method, model, scores, seed) if name == "fp32" else _esft(model, experts)
            train_loop(tuned, finetuning_stream(tokenizer, settings, seed), settings.finetune_steps, args.lr,
                       weight_decay=0.1, progress=False)
            result[name] = {"before": before, "after": accuracy(tuned)}
            print(f"seed {seed} {name}: before {before}, after {result[name]['after']}", flush=True)
    return result


def _esft(model: torch.nn.Module, experts: dict[str, list[int]]) -> torch.nn.Module:
    from peft import get_peft_model

    from esft_peft import ESFTConfig

    return get_peft_model(model, ESFTConfig(experts=experts))


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    table = {}
    for base in ("fp32", "nf4"):
        for when in ("before", "after"):
            for metric in ("target", "retention"):
                values = [r[base][when][metric] for r in results]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                table[f"{base} {when} {metric}"] = (statistics.mean(values), spread)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", default="full")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with quiet_libraries():
        results = [run_seed(seed, args) for seed in args.seeds]
    table = summary(results)
    for key, (mean, spread) in table.items():
        print(f"{key:<28} {100 * mean:5.1f} +- {100 * spread:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": None}, "seeds": results,
                                         "summary": table}, indent=2))


if __name__ == "__main__":
    main()
