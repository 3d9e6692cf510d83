"""A learning-rate sweep for ESFT on the built-in demo MoE, evaluated on the validation split (CPU, minutes).

For each seed: pre-train the demo base, score the target domain's experts and select them as `esft-peft demo` does
(token scores, the demo's p), then train the selected experts as the demo does (its steps and batch size, AdamW
0.9/0.95, weight decay 0.1, gradient clipping at 1) at each learning rate, and report exact-match accuracy on the
validation split of the target domain and of the other domains (retention). The test split is never used.

    python examples/lr_sweep.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import torch

from esft_peft.demo import load_settings, pretrain_base
from esft_peft.demo import synthetic_tasks as st
from esft_peft.demo.methods import demo_method, prepare
from esft_peft.quiet import quiet_libraries
from esft_peft.demo.settings import SIZES, DemoSettings
from esft_peft.demo.training import finetuning_stream, score_domain, train_loop


def validate(model: torch.nn.Module, tokenizer, settings: DemoSettings) -> tuple[float, float]:
    """(target-domain accuracy, mean accuracy on the other domains) on the validation split."""
    accuracy = st.evaluate_domains(model, tokenizer, settings.domains, settings.eval_examples, split="validation",
                                   length=settings.sequence_words)
    return accuracy[settings.target_domain], st.retention(accuracy, settings.target_domain)


def sweep_seed(settings: DemoSettings, seed: int, rates: list[float]) -> dict[float, tuple[float, float]]:
    """{learning rate: (target accuracy, retention)} on one pre-trained base; key 0.0 holds the base itself."""
    base, tokenizer = pretrain_base(settings, seed=seed, progress=False)
    method = demo_method(settings.demo_top_p)
    scores = score_domain(base, tokenizer, settings, settings.target_domain, seed)
    results = {0.0: validate(base, tokenizer, settings)}
    for rate in rates:
        model = prepare(method, base, scores, seed)
        train_loop(model, finetuning_stream(tokenizer, settings, seed), settings.finetune_steps, rate,
                   weight_decay=0.1, progress=False)
        results[rate] = validate(model, tokenizer, settings)
        print(f"seed {seed} lr {rate:g}: {settings.target_domain} {results[rate][0]:.1%}, "
              f"retention {results[rate][1]:.1%}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pre-trained base per seed")
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--size", default="full", choices=SIZES, help="demo model size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo model is tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.size)
    with quiet_libraries():
        runs = {seed: sweep_seed(settings, seed, args.rates) for seed in args.seeds}
    seeds = " / ".join(map(str, args.seeds))
    print(f"| learning rate | {settings.target_domain} (trained), seeds {seeds} | "
          f"other domains (mean), seeds {seeds} |")
    print("| --- | --- | --- |")
    for rate in [0.0, *args.rates]:
        target = " / ".join(f"{100 * runs[seed][rate][0]:.1f}" for seed in args.seeds)
        others = " / ".join(f"{100 * runs[seed][rate][1]:.1f}" for seed in args.seeds)
        label = f"{rate:g}" + (" (the demo's)" if rate == settings.learning_rates["ESFT"] else "")
        print(f"| {label if rate else 'base, before ESFT'} | {target} | {others} |")


if __name__ == "__main__":
    main()
