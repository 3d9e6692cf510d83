"""The ESFT paper's experiments in miniature: routing analysis and Tables 1-4 on the demo's domains.

One unit of work is (architecture, seed): pre-train a base (fine-grained experts, or coarse experts with the same
active and total expert parameters), measure every domain's routing (at initialisation and after pre-training),
then fine-tune the target domain's task with every method. Each method's learning rate is tuned per seed on the
validation split (the highest validation accuracy on the target task; among learning rates within
``LR_TOLERANCE`` of it, the smallest), and test accuracy is reported for that learning rate.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..defaults import PAPER_TOP_P
from . import synthetic_tasks as st
from .methods import METHODS, prepare, select_experts
from ..quiet import quiet_libraries
from .routing import routing_summary, selection_coverage
from .settings import DemoSettings
from .training import (
    build_model, count_parameters, finetuning_stream, pretrain_base, score_domain, scoring_batch, train_loop,
)

logger = logging.getLogger(__name__)

ARCHITECTURES = ("fine", "coarse")
METHODS_BY_ARCHITECTURE = {"fine": list(METHODS), "coarse": ["FFT", "ESFT-Token", "ESFT-Gate"]}
LR_TOLERANCE = 0.01
BYTES_PER_PARAMETER = 4  # float32 artifacts


def pick_learning_rate(validation: dict[float, float], tolerance: float = LR_TOLERANCE) -> float:
    """The learning rate with the best validation accuracy; among those within ``tolerance`` of it, the smallest."""
    if not validation:
        raise ValueError("No validation results to pick a learning rate from.")
    best = max(validation.values())
    return min(lr for lr, accuracy in validation.items() if accuracy >= best - tolerance)


def _accuracy_row(accuracy: dict[str, float], target: str) -> dict[str, Any]:
    return {"test": accuracy, "target": accuracy[target], "retention": st.retention(accuracy, target)}


def run_unit(settings: DemoSettings, architecture: str, seed: int, methods: Optional[list[str]] = None,
             log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Pre-train one base, analyse its routing, and fine-tune the target task with every method (LR tuned)."""
    with quiet_libraries():
        return _run_unit(settings, architecture, seed, methods, log)


def _run_unit(settings: DemoSettings, architecture: str, seed: int, methods: Optional[list[str]],
              log: Callable[[str], None]) -> dict[str, Any]:
    torch.manual_seed(seed)
    methods = METHODS_BY_ARCHITECTURE[architecture] if methods is None else methods
    coarse = architecture == "coarse"
    target = settings.target_domain
    tokenizer = st.build_tokenizer()
    cache: dict = {}

    def evaluate(model: nn.Module, split: str, domains: list[str]) -> dict[str, float]:
        return st.evaluate_domains(model, tokenizer, domains, settings.eval_examples, split=split,
                                   length=settings.sequence_words, cache=cache)

    initial = build_model(settings, seed, coarse)
    initial_scores = {d: score_domain(initial, tokenizer, settings, d, seed) for d in settings.domains}
    started = time.perf_counter()
    base, _ = pretrain_base(settings, seed, coarse, progress=False)
    pretrain_seconds = time.perf_counter() - started
    base_parameters = count_parameters(base)
    scores = {d: score_domain(base, tokenizer, settings, d, seed) for d in settings.domains}
    target_batch = scoring_batch(tokenizer, settings, target, seed)
    routing = {
        "initial": routing_summary(initial_scores),
        "token": routing_summary(scores, "token"),
        "gate": routing_summary(scores, "gate"),
    }
    unit = {"architecture": architecture, "seed": seed, "base_parameters": base_parameters,
            "pretrain_seconds": round(pretrain_seconds, 1), "routing": routing,
            "scores": {d: s.to_dict() for d, s in scores.items()}, "rows": []}
    unit["rows"].append({"method": "Vanilla", "learning_rate": None, "chosen": True, "validation": None, "coverage": None,
                         **_accuracy_row(evaluate(base, "test", settings.domains), target),
                         "trained_parameters": 0, "trained_fraction": 0.0, "experts": 0, "seconds": 0.0})
    log(f"{architecture} seed {seed}: pre-trained in {pretrain_seconds:.0f} s; base "
        f"{unit['rows'][0]['target']:.0%} on {target}, {unit['rows'][0]['retention']:.0%} on the others")
    for name in methods:
        method = METHODS[name]
        experts = select_experts(method, scores[target], seed) if method.family == "ESFT" else {}
        coverage = selection_coverage(base, target_batch, experts)["any"] if experts else None
        candidates = []
        for lr in settings.learning_rate_grids[method.family]:
            model = prepare(method, base, scores[target], seed)
            tick = time.perf_counter()
            train_loop(model, finetuning_stream(tokenizer, settings, seed), settings.finetune_steps, lr,
                       weight_decay=0.1, progress=False)
            seconds = time.perf_counter() - tick
            parameters = count_parameters(model, trainable=True)
            candidates.append({
                "method": name, "learning_rate": lr, "validation": evaluate(model, "validation", [target])[target],
                **_accuracy_row(evaluate(model, "test", settings.domains), target),
                "trained_parameters": parameters, "trained_fraction": parameters / base_parameters,
                "experts": sum(len(ids) for ids in experts.values()), "selection": experts, "coverage": coverage,
                "seconds": round(seconds, 2),
            })
        chosen = pick_learning_rate({row["learning_rate"]: row["validation"] for row in candidates})
        for row in candidates:
            row["chosen"] = row["learning_rate"] == chosen
        unit["rows"] += candidates
        best = next(row for row in candidates if row["chosen"])
        log(f"{architecture} seed {seed} {name:<24} lr {chosen:g}: {target} {best['target']:.1%}, "
            f"retention {best['retention']:.1%}")
    return unit


def _run_unit_job(args: tuple) -> dict[str, Any]:
    settings, architecture, seed, methods = args
    torch.set_num_threads(1)
    return run_unit(settings, architecture, seed, methods, log=lambda line: print(line, flush=True))


def run_miniature(settings: DemoSettings, seeds: list[int], jobs: int = 1,
                  architectures: tuple[str, ...] = ARCHITECTURES,
                  methods: Optional[dict[str, list[str]]] = None,
                  log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Every (architecture, seed) unit, in ``jobs`` worker processes (1: in this process); returns the results."""
    methods = methods or METHODS_BY_ARCHITECTURE
    work = [(settings, architecture, seed, methods[architecture]) for architecture in architectures for seed in seeds]
    started = time.perf_counter()
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            units = pool.map(_run_unit_job, work, chunksize=1)
    else:
        units = [run_unit(*job, log=log) for job in work]
    return {
        "seeds": seeds,
        "architectures": {a: {**settings.model, **(settings.coarse_model if a == "coarse" else {})}
                          for a in architectures},
        "domains": settings.domains,
        "target_domain": settings.target_domain,
        "pretrain_steps": settings.pretrain_steps,
        "finetune_steps": settings.finetune_steps,
        "finetune_batch_size": settings.finetune_batch_size,
        "learning_rate_grids": settings.learning_rate_grids,
        "lr_rule": f"highest validation accuracy on {settings.target_domain}; smallest lr within "
                   f"{LR_TOLERANCE:g} of it",
        "top_p": dict(PAPER_TOP_P),
        "units": units,
        "seconds": round(time.perf_counter() - started, 1),
    }


def chosen_rows(results: dict[str, Any], architecture: str, method: str) -> list[dict[str, Any]]:
    """The tuned row of ``method`` for every seed, in seed order."""
    rows = []
    for unit in results["units"]:
        if unit["architecture"] == architecture:
            rows += [row for row in unit["rows"] if row["method"] == method and row["chosen"]]
    return rows
