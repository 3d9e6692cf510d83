"""Routing analysis as in the paper's section 2: how concentrated each task's routing is, and how much the experts
selected for different tasks overlap."""

from __future__ import annotations

import statistics
from typing import Mapping, Optional

import torch
from torch import nn

from ..defaults import PAPER_TOP_P
from ..moe.discovery import find_moe_layers
from ..scoring.comparison import concentration
from ..scoring.routing_capture import capture_routing
from ..scoring.scores import ExpertScores
from ..scoring.selection import overlap, ranked

Selection = Mapping[str, list[int]]


def top_share(scores: ExpertScores, k: Optional[int] = None) -> dict[str, float]:
    """Per layer, the share of routed (token, expert) pairs held by the ``k`` most-used experts (default: as many as
    a token uses, ``scores.top_k``). Uniform routing gives ``k / experts``; one routing pattern for every token
    gives 1."""
    k = scores.top_k if k is None else k
    if not k or k < 1:
        raise ValueError(f"k must be a positive number of experts, got {k!r} (the scores record no top_k).")
    values = scores.token_scores
    return {layer: sum(values[layer][e] for e in ranked(values[layer])[:k]) / sum(values[layer])
            for layer in scores.layers}


def overlap_matrix(selections: Mapping[str, Selection]) -> dict[str, dict[str, float]]:
    """For every pair of tasks, the Jaccard index of their selected experts, averaged over layers."""
    return {
        a: {b: statistics.mean(entry["jaccard"] for entry in overlap(first, second).values())
            for b, second in selections.items()}
        for a, first in selections.items()
    }


def routing_summary(scores: Mapping[str, ExpertScores], score_function: str = "token",
                    top_p: Optional[float] = None) -> dict:
    """Concentration of every task (means over layers) and the overlap matrix of their top-p selections."""
    top_p = PAPER_TOP_P[score_function] if top_p is None else top_p
    tasks = {}
    for task, task_scores in scores.items():
        per_layer = concentration(task_scores, score_function, top_p)
        experts = statistics.mean(task_scores.num_experts.values())
        tasks[task] = {
            "top_k": task_scores.top_k,
            "top_share": statistics.mean(top_share(task_scores).values()),
            "uniform_share": task_scores.top_k / experts,
            "experts_to_p": statistics.mean(entry["experts"] for entry in per_layer.values()),
            "entropy": statistics.mean(entry["entropy"] for entry in per_layer.values()),
        }
    selections = {task: task_scores.select(score_function, top_p) for task, task_scores in scores.items()}
    return {"score_function": score_function, "top_p": top_p, "tasks": tasks,
            "overlap": overlap_matrix(selections), "selections": selections}


@torch.no_grad()
def selection_coverage(model: nn.Module, batch: dict[str, torch.Tensor], selection: Selection) -> dict[str, float]:
    """Share of the batch's counted tokens (label != -100) that reach at least one selected expert: per selected
    layer, and under ``"any"`` in at least one of them. ESFT can change a token's computation only through the
    selected experts it is routed to."""
    layers = find_moe_layers(model)
    counted = (batch["labels"] != -100).reshape(-1)
    reached: dict[str, torch.Tensor] = {}

    def recorder(key: str, chosen: torch.Tensor):
        def record(index: torch.Tensor, weights: torch.Tensor) -> None:
            reached[key] = torch.isin(index.reshape(counted.numel(), -1), chosen).any(dim=-1)
        return record

    handles = [capture_routing(model, layers[key], recorder(key, torch.tensor(ids)))
               for key, ids in selection.items()]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    total = int(counted.sum())
    coverage = {key: int((hit & counted).sum()) / total for key, hit in reached.items()}
    coverage["any"] = int((torch.stack(list(reached.values())).any(dim=0) & counted).sum()) / total
    return coverage
