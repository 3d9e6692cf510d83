"""A learning-rate sweep for ESFT on the built-in demo MoE, evaluated on a held-out validation split (CPU, minutes).

For each seed: pre-train the demo base, score and select experts (token scores, p = 0.2), then train the selected
experts as `esft-peft demo` does (150 steps of batch 64, AdamW 0.9/0.95, weight decay 0.1) at each learning rate,
and report exact-match accuracy on held-out examples of the target task and of the other (untrained) tasks. The
validation examples use seeds disjoint from the training data and from the demo's test examples.

    python examples/lr_sweep.py --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from peft import get_peft_model

from esft_peft import ESFTConfig, demo
from esft_peft.demo import synthetic_tasks as st

VALIDATION_SEED = 20_000  # the demo's test examples use seed 10_000, training streams seeds from 0


def sweep_seed(settings: demo.DemoSettings, seed: int, rates: list[float]) -> dict[float, tuple[float, float]]:
    """{learning rate: (target-task accuracy, mean accuracy on the other tasks)} on one pre-trained base; 0.0: the base itself."""
    base, tokenizer = demo.pretrain_base(settings, seed=seed, progress=False)
    experts = demo.run.score_task(base, tokenizer, settings, seed).select("token", top_p=settings.top_p)
    print(f"seed {seed}: experts {dict(experts)}", flush=True)
    results = {0.0: validate(base, tokenizer, settings)}  # the base before ESFT
    for rate in rates:
        model = get_peft_model(copy.deepcopy(base), ESFTConfig(experts=experts))
        stream = demo.run.task_stream(tokenizer, settings.target_task, settings.batch_size, seed + 1,
                                      settings.sequence_digits)
        demo.run.train_loop(model, stream, settings.esft_steps, rate, weight_decay=0.1, progress=False)
        results[rate] = validate(model, tokenizer, settings)
        print(f"seed {seed} lr {rate:g}: {settings.target_task} {results[rate][0]:.1%}, other tasks "
              f"{results[rate][1]:.1%}", flush=True)
    return results


def validate(model: torch.nn.Module, tokenizer, settings: demo.DemoSettings) -> tuple[float, float]:
    """(target-task accuracy, mean accuracy on the other tasks) on the validation examples."""
    accuracy = st.evaluate_tasks(model, tokenizer, settings.tasks, settings.eval_examples, seed=VALIDATION_SEED,
                                 length=settings.sequence_digits)
    others = statistics.mean(value for task, value in accuracy.items() if task != settings.target_task)
    return accuracy[settings.target_task], others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pre-trained base per seed")
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--size", default="full", choices=("full", "quick"), help="demo model size")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = demo.load_settings(args.size)
    runs = {seed: sweep_seed(settings, seed, args.rates) for seed in args.seeds}
    print(f"| learning rate | {settings.target_task} (target), per seed | other tasks, per seed |")
    print("| --- | --- | --- |")
    for rate in [0.0, *args.rates]:
        target = " / ".join(f"{100 * runs[seed][rate][0]:.1f}" for seed in args.seeds)
        others = " / ".join(f"{100 * runs[seed][rate][1]:.1f}" for seed in args.seeds)
        print(f"| {f'{rate:g}' if rate else 'base (no ESFT)'} | {target} | {others} |")


if __name__ == "__main__":
    main()
