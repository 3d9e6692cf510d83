"""The ESFT paper's main comparison, in miniature, on the built-in demo MoE (CPU, a few minutes).

For one specialised synthetic task it compares, over several seeds: the vanilla model, full fine-tuning (FFT),
LoRA, ESFT-Token, ESFT-Gate and ESFT with random experts at ESFT-Token's budget (paper Tables 1, 2 and 4 in small).
Reported per method: specialised-task accuracy, retention (mean accuracy on the other, untrained tasks), trained
parameters and training time, as mean +- standard deviation over seeds.

    python examples/paper_in_miniature.py --seeds 0 1 2 --out paper_in_miniature.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import esft_peft
from esft_peft import ESFTConfig
from esft_peft import demo
from esft_peft.demo import synthetic_tasks as st

logger = logging.getLogger("paper_in_miniature")

# Per-method learning rates for a tiny model and 150 steps. The paper's ratios (ESFT 1e-5 < FFT 3e-5 < LoRA 1e-4)
# did not transfer: ESFT trains only a few experts, and at 1e-3 they did not learn the task in 150 steps.
LEARNING_RATES = {"FFT": 3e-4, "LoRA": 1e-3, "ESFT-Token": 1e-2, "ESFT-Gate": 1e-2, "ESFT-Random": 1e-2}
METHODS = ["Vanilla", "FFT", "LoRA", "ESFT-Token", "ESFT-Gate", "ESFT-Random"]


def prepare(method: str, base: nn.Module, selections: dict[str, dict[str, list[int]]]) -> nn.Module:
    """A trainable copy of ``base`` for ``method``."""
    model = copy.deepcopy(base)
    if method == "FFT":
        model.requires_grad_(True)
        return model
    if method == "LoRA":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return get_peft_model(model, ESFTConfig(experts=selections[method]))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_seed(settings: demo.DemoSettings, seed: int, steps: int, log: Callable[[str], None]) -> dict[str, dict]:
    """Pre-train a base for ``seed`` and evaluate every method on it."""
    started = time.perf_counter()
    base, tokenizer = demo.pretrain_base(settings, seed=seed, progress=False)
    log(f"seed {seed}: pre-trained in {time.perf_counter() - started:.0f} s")
    others = [task for task in settings.tasks if task != settings.target_task]
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def evaluate(model: nn.Module) -> dict[str, float]:
        accuracy = st.evaluate_tasks(model, tokenizer, settings.tasks, settings.eval_examples,
                                     length=settings.sequence_digits, cache=cache)
        return {"task": accuracy[settings.target_task], "retention": statistics.mean(accuracy[t] for t in others)}

    scores = demo.score_task(base, tokenizer, settings, seed)
    selections = {
        "ESFT-Token": scores.select(score_function="token", top_p=0.2),
        "ESFT-Gate": scores.select(score_function="gate", top_p=0.1),
    }
    # Table 4's control: as many experts per layer as ESFT-Token, drawn at random.
    selections["ESFT-Random"] = scores.select(score_function="token", top_p=0.2, randomize=True, seed=seed)
    results = {"Vanilla": {**evaluate(base), "parameters": 0, "seconds": 0.0, "experts": 0}}
    for method in METHODS[1:]:
        model = prepare(method, base, selections)
        stream = demo.task_stream(tokenizer, settings.target_task, settings.batch_size, seed + 1, settings.sequence_digits)
        started = time.perf_counter()
        demo.train_loop(model, stream, steps, LEARNING_RATES[method], weight_decay=0.1, progress=False)
        seconds = time.perf_counter() - started
        experts = sum(len(ids) for ids in selections.get(method, {}).values())
        results[method] = {**evaluate(model), "parameters": trainable_parameters(model), "seconds": seconds,
                           "experts": experts}
        log(f"seed {seed} {method:<12} task {results[method]['task']:.3f} retention {results[method]['retention']:.3f}")
    return results


def _mean_spread(values: list[float], fmt: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(spread, fmt)}"


def summarise(runs: list[dict[str, dict]]) -> str:
    """Markdown table: mean ± standard deviation over seeds."""
    lines = [
        "| method | specialised task acc. (%) | retention on other tasks (%) | trained experts | trained params "
        "| train time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        column = lambda key, scale=1.0: [scale * run[method][key] for run in runs]  # noqa: E731
        lines.append(
            f"| {method} | {_mean_spread(column('task', 100), '.1f')} | {_mean_spread(column('retention', 100), '.1f')} "
            f"| {statistics.mean(column('experts')):.1f} | {statistics.mean(column('parameters')):,.0f} "
            f"| {_mean_spread(column('seconds'), '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pre-trained base per seed")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method (default: the demo's)")
    parser.add_argument("--size", default="full", choices=("full", "quick"), help="demo model size")
    parser.add_argument("--out", help="also write all measurements as JSON")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = demo.load_settings(args.size)
    steps = args.steps or settings.esft_steps
    print(f"esft-peft {esft_peft.__version__}: target task {settings.target_task!r}, tasks {settings.tasks}, "
          f"{steps} fine-tuning steps, seeds {args.seeds}")
    runs = [run_seed(settings, seed, steps, lambda line: print(line, flush=True)) for seed in args.seeds]
    table = summarise(runs)
    print(table)
    if args.out:
        from esft_peft.interop.files import atomic_write_text

        atomic_write_text(args.out, json.dumps({"seeds": args.seeds, "steps": steps, "runs": runs, "table": table},
                                               indent=2))


if __name__ == "__main__":
    main()
