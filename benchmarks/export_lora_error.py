"""Sizes and export errors: full-rank ESFT, low-rank ESFT and LoRA, and a full-rank adapter exported to peft LoRA.

    python benchmarks/export_lora_error.py [--seed 0] [--ranks 1 2 4 8 16 32] [--json OUT]

On the demo's DeepSeek-V2-shaped MoE (64 routed experts of width 16, the base of docs/paper_in_miniature.md) the law
task is learned with ESFT-Token (full rank), ESFT-Token at rank 8 and LoRA (r 8, every linear), each at the learning
rate the miniature chose for seed 0. The full-rank adapter is then exported to peft LoRA at each rank of ``--ranks``
(SVD truncation): the table gives the worst and mean per-expert relative error, the exported file's size, and the
law accuracy and retention of peft's LoRA loaded from the export, against the ESFT adapter's own. The rank-8 ESFT
adapter's export is exact; its logits are compared with peft's LoRA too. Sizes are the adapter safetensors files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from esft_peft import ESFTConfig, export_lora
from esft_peft.demo import synthetic_tasks as st
from esft_peft.demo.methods import LORA_RANK, METHODS, select_experts
from esft_peft.demo.settings import load_settings
from esft_peft.demo.training import finetuning_stream, pretrain_base, score_domain, train_loop

LEARNING_RATES = {"ESFT": 1e-3, "ESFT r=8": 1e-3, "LoRA": 1e-4}  # the miniature's choices on seed 0


def _file_size(directory: Path) -> int:
    return (directory / "adapter_model.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--size", default="full", choices=("full", "quick"), help="'quick': a smoke test")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    settings = load_settings(args.size)
    base, tokenizer = pretrain_base(settings, args.seed, progress=False)
    target = settings.target_domain
    experts = select_experts(METHODS["ESFT-Token"], score_domain(base, tokenizer, settings, target, args.seed))
    cache: dict = {}

    def fresh_base() -> torch.nn.Module:
        model = type(base)(base.config)
        model.load_state_dict(base.state_dict())
        return model.eval()

    def accuracy(model: torch.nn.Module) -> dict[str, float]:
        scores = st.evaluate_domains(model, tokenizer, settings.domains, settings.eval_examples, split="test",
                                     length=settings.sequence_words, cache=cache)
        return {"target": scores[target], "retention": st.retention(scores, target)}

    def train(model: torch.nn.Module, lr: float) -> torch.nn.Module:
        train_loop(model, finetuning_stream(tokenizer, settings, args.seed), settings.finetune_steps, lr,
                   weight_decay=0.1, progress=False)
        return model.eval()

    results: dict = {"experts": experts, "sizes": {}, "export": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapters = {
            "ESFT": get_peft_model(fresh_base(), ESFTConfig(experts=experts)),
            "ESFT r=8": get_peft_model(fresh_base(), ESFTConfig(experts=experts, delta_rank=8, delta_alpha=16)),
            "LoRA": get_peft_model(fresh_base(), LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                            target_modules="all-linear")),
        }
        for name, model in adapters.items():
            train(model, LEARNING_RATES[name]).save_pretrained(work / name)
            results["sizes"][name] = {"bytes": _file_size(work / name), **accuracy(model)}
        exact = export_lora(work / "ESFT r=8", work / "lora-from-r8", base_model=fresh_base())
        lora = PeftModel.from_pretrained(fresh_base(), str(work / "lora-from-r8"))
        ids = torch.randint(3, len(tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = (lora(input_ids=ids).logits - adapters["ESFT r=8"](input_ids=ids).logits).abs().max().item()
        results["sizes"]["LoRA export of ESFT r=8"] = {"bytes": exact.adapter_bytes, "exact": exact.exact,
                                                       "max_logit_difference": difference, **accuracy(lora)}
        for rank in args.ranks:
            out = work / f"lora-r{rank}"
            export = export_lora(work / "ESFT", out, rank=rank, base_model=fresh_base())
            errors = list(export.errors.values())
            results["export"].append({
                "rank": rank, "max_error": max(errors), "mean_error": statistics.mean(errors),
                "bytes": export.adapter_bytes, **accuracy(PeftModel.from_pretrained(fresh_base(), str(out))),
            })
    print(f"selected experts: {experts}")
    print("\n| adapter | file bytes | law acc. % | retention % |\n| --- | --- | --- | --- |")
    for name, row in results["sizes"].items():
        print(f"| {name} | {row['bytes']:,} | {100 * row['target']:.1f} | {100 * row['retention']:.1f} |")
    print(f"\nexport of ESFT r=8: exact={results['sizes']['LoRA export of ESFT r=8']['exact']}, max |logit "
          f"difference| {results['sizes']['LoRA export of ESFT r=8']['max_logit_difference']:.2e}")
    print("\n| export rank | max rel. error | mean rel. error | file bytes | law acc. % | retention % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results["export"]:
        print(f"| {row['rank']} | {row['max_error']:.3f} | {row['mean_error']:.3f} | {row['bytes']:,} | "
              f"{100 * row['target']:.1f} | {100 * row['retention']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
