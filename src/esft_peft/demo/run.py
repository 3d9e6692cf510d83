"""The built-in, offline ESFT demo: ``esft-peft demo --out DIR``.

Builds a small DeepSeek-V2-style MoE (routed + shared experts) from the packaged ``demo_config.json``, pre-trains it
on a mixture of synthetic tasks with task tags (so routing specialises), then runs the whole ESFT pipeline for one
under-trained task: score experts, select (top-p), train the selected experts, evaluate, save, reload in a fresh
model, merge. Prints a table and writes the scores, the heatmap, the expert config, the adapter and the merged model.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..defaults import EXPERT_CONFIG_NAME
from . import synthetic_tasks as st

logger = logging.getLogger(__name__)

CONFIG_RESOURCE = "config.json"


@dataclass
class DemoSettings:
    """Everything a demo run needs, read from the packaged config for one size ("full" or "quick")."""

    model_type: str
    model: dict[str, Any]
    tasks: list[str]
    target_task: str
    target_pretrain_weight: float
    sequence_digits: int
    pretrain_steps: int
    pretrain_lr: float
    esft_steps: int
    esft_lr: float
    batch_size: int
    score_examples: int
    eval_examples: int
    top_p: float


def load_settings(size: str = "full", **overrides: Any) -> DemoSettings:
    """Settings of the packaged demo for ``size``; keyword overrides replace single fields."""
    raw = json.loads(resources.files("esft_peft.demo").joinpath(CONFIG_RESOURCE).read_text(encoding="utf-8"))
    if size not in raw["sizes"]:
        raise ValueError(f"Unknown demo size {size!r}; choose one of {sorted(raw['sizes'])}.")
    sized = dict(raw["sizes"][size])
    model = {**raw["model"], **sized.pop("model")}
    values = {key: raw[key] for key in ("model_type", "tasks", "target_task", "target_pretrain_weight", "sequence_digits")}
    settings = DemoSettings(model=model, **values, **sized)
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise ValueError(f"Unknown demo setting {key!r}.")
        setattr(settings, key, value)
    if settings.target_task not in settings.tasks:
        raise ValueError(f"The target task {settings.target_task!r} must be one of the tasks {settings.tasks}.")
    return settings


def build_model(settings: DemoSettings, seed: int = 0) -> nn.Module:
    """A randomly initialised demo MoE (a native transformers model) sized for the synthetic vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = st.build_tokenizer()
    config = AutoConfig.for_model(
        settings.model_type, vocab_size=len(st.vocabulary()), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **settings.model,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def pretrain_weights(settings: DemoSettings) -> dict[str, float]:
    """Task mixture of pre-training: the target task is rare, so the base model is weak at it."""
    return {task: settings.target_pretrain_weight if task == settings.target_task else 1.0 for task in settings.tasks}


def train_loop(
    model: nn.Module, batches, steps: int, lr: float, weight_decay: float = 0.0, desc: str = "training",
    progress: bool = True,
) -> list[float]:
    """AdamW (betas 0.9/0.95, as in the paper) over the trainable parameters, gradient clipping at 1; returns losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def mixture_stream(tokenizer, weights: dict[str, float], batch_size: int, seed: int, digits: int):
    rng = random.Random(seed)
    while True:
        yield st.mixture_batch(tokenizer, weights, batch_size, rng, length=digits)


def task_stream(tokenizer, task: str, batch_size: int, seed: int, digits: int):
    step = 0
    while True:
        yield st.encode_examples(tokenizer, task, batch_size, seed=seed * 1_000_003 + step, length=digits)
        step += 1


def pretrain_base(settings: DemoSettings, seed: int = 0, progress: bool = True) -> tuple[nn.Module, Any]:
    """Build and pre-train the demo MoE on the task mixture; returns (model in eval mode, tokenizer)."""
    tokenizer = st.build_tokenizer()
    model = build_model(settings, seed)
    stream = mixture_stream(tokenizer, pretrain_weights(settings), settings.batch_size, seed, settings.sequence_digits)
    losses = train_loop(model, stream, settings.pretrain_steps, settings.pretrain_lr, desc="pre-training", progress=progress)
    logger.info("pre-training done: final loss %.3f", sum(losses[-20:]) / len(losses[-20:]))
    return model, tokenizer


def score_task(model: nn.Module, tokenizer, settings: DemoSettings, seed: int = 0, progress: bool = False):
    """Expert relevance scores of the target task, counted on answer tokens (prompt tokens are masked)."""
    from ..scoring.score import score_experts

    batch = st.encode_examples(tokenizer, settings.target_task, settings.score_examples, seed=seed + 500,
                               length=settings.sequence_digits)
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"])]
    return score_experts(model, examples, token_budget=None, batch_size=64, seed=seed, show_progress=progress)


def _size_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


DEMO_THREADS = 1  # the demo model is tiny: one thread is as fast as two, and far faster on a busy machine


def run_demo(out_dir: str | Path, size: str = "full", seed: int = 0, progress: bool = True, **overrides: Any) -> dict:
    """Run the whole demo (on ``DEMO_THREADS`` CPU threads); writes its artifacts under ``out_dir`` and returns
    the measured results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        return _run_demo(out_dir, size, seed, progress, **overrides)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir: str | Path, size: str, seed: int, progress: bool, **overrides: Any) -> dict:
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from ..interop.files import atomic_directory_write, atomic_write_text
    from ..interop.hub import adapter_statistics, write_model_card
    from ..scoring.plotting import plot_scores
    from ..tuners.esft.config import ESFTConfig

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(size, **overrides)
    eval_cache: dict[str, dict[str, torch.Tensor]] = {}

    def evaluate(model: nn.Module) -> dict[str, float]:
        return st.evaluate_tasks(model, tokenizer, settings.tasks, settings.eval_examples, length=settings.sequence_digits,
                                 cache=eval_cache)

    model, tokenizer = pretrain_base(settings, seed, progress)
    before = evaluate(model)

    def save_base(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory_write(out / "base", save_base)
    model.name_or_path = str((out / "base").resolve())  # recorded as the adapter's base model

    scores = score_task(model, tokenizer, settings, seed, progress)
    scores.save(out / "scores.json")
    experts = scores.select(score_function="token", top_p=settings.top_p)
    plot_scores(scores, path=out / "heatmap.png", selection=experts)
    config = ESFTConfig(experts=experts)
    config.save_expert_config(out / EXPERT_CONFIG_NAME)

    peft_model = get_peft_model(model, config)
    stats = adapter_statistics(peft_model)
    stream = task_stream(tokenizer, settings.target_task, settings.batch_size, seed + 1, settings.sequence_digits)
    losses = train_loop(peft_model, stream, settings.esft_steps, settings.esft_lr, weight_decay=0.1, desc="ESFT",
                        progress=progress)
    after = evaluate(peft_model)

    def save_adapter(tmp: Path) -> None:
        peft_model.save_pretrained(tmp)
        write_model_card(peft_model, tmp)

    atomic_directory_write(out / "adapter", save_adapter)
    fresh = AutoModelForCausalLM.from_pretrained(out / "base")
    reloaded = PeftModel.from_pretrained(fresh, out / "adapter").eval()
    reloaded_acc = evaluate(reloaded)
    merged = reloaded.merge_and_unload()

    def save_merged(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory_write(out / "merged", save_merged)
    merged_acc = evaluate(AutoModelForCausalLM.from_pretrained(out / "merged").eval())

    results = {
        "size": size,
        "target_task": settings.target_task,
        "experts": experts,
        "before": before,
        "after": after,
        "reloaded": reloaded_acc,
        "merged": merged_acc,
        "esft_loss": {"first": losses[0], "last": sum(losses[-5:]) / len(losses[-5:])},
        "adapter_parameters": stats["adapter_parameters"],
        "trainable_fraction": stats["trainable_fraction"],
        "adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size,
        "base_bytes": _size_bytes(out / "base"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    """The demo's summary table (plain text)."""
    target = results["target_task"]
    lines = [f"{'task':<12} {'before':>8} {'after ESFT':>11} {'reloaded':>9} {'merged':>8}"]
    for task, value in results["before"].items():
        name = f"{task}*" if task == target else task
        lines.append(
            f"{name:<12} {value:>8.1%} {results['after'][task]:>11.1%} {results['reloaded'][task]:>9.1%} "
            f"{results['merged'][task]:>8.1%}"
        )
    selected = sum(len(ids) for ids in results["experts"].values())
    lines += [
        "* ESFT target task. Other rows: retention of the tasks ESFT did not train on.",
        f"trained experts: {selected} in {len(results['experts'])} MoE layers {results['experts']}",
        f"trainable fraction: {results['trainable_fraction']:.2%} ({results['adapter_parameters']:,} parameters)",
        f"adapter size: {results['adapter_bytes'] / 1024:.1f} KiB (base model {results['base_bytes'] / 1024:.1f} KiB)",
        f"wall time: {results['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def main(out_dir: str, size: str = "full", seed: int = 1, progress: bool = True) -> dict:
    """Run the demo and print its table (used by ``esft-peft demo``)."""
    results = run_demo(out_dir, size=size, seed=seed, progress=progress)
    print(format_table(results))
    print(f"artifacts in {out_dir}: base/, adapter/, merged/, scores.json, heatmap.png, {EXPERT_CONFIG_NAME}")
    return results

