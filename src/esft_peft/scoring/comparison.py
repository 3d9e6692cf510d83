"""Compare the expert relevance of two tasks: per-layer overlap of selections and routing concentration."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..defaults import PAPER_TOP_P
from . import selection as rules
from .scores import ExpertScores, IncompatibleScoresError


@dataclass
class TaskComparison:
    """Numbers comparing two tasks' expert scores (draw them with :func:`esft_peft.scoring.plotting.plot_comparison`).

    Attributes:
        labels: names of the two tasks.
        selections: label -> per-layer selection (top-p rule).
        overlap: layer -> {"a", "b": selection sizes, "shared": experts in both, "jaccard"}.
        concentration: label -> layer -> {"experts": experts needed to reach p, "share": that over all experts,
            "entropy": entropy of the layer's scores divided by log(E) (1 = uniform routing, 0 = one expert)}.
        mean_jaccard: mean over layers of the Jaccard index.
    """

    labels: tuple[str, str]
    score_function: str
    top_p: float
    selections: dict[str, dict[str, list[int]]]
    overlap: dict[str, dict[str, float]]
    concentration: dict[str, dict[str, dict[str, float]]]
    mean_jaccard: float


def concentration(scores: ExpertScores, score_function: str, top_p: float) -> dict[str, dict[str, float]]:
    """Per layer: experts needed to reach ``top_p``, their share of all experts, and normalised score entropy."""
    values = scores.scores(score_function)
    chosen = rules.select_top_p(values, top_p)
    result = {}
    for layer in scores.layers:
        total = sum(values[layer])
        probabilities = [v / total for v in values[layer] if v > 0] if total > 0 else []
        entropy = -sum(p * math.log(p) for p in probabilities)
        experts = len(values[layer])
        result[layer] = {
            "experts": len(chosen[layer]),
            "share": len(chosen[layer]) / experts,
            "entropy": entropy / math.log(experts) if experts > 1 else 0.0,
        }
    return result


def compare_tasks(
    a: ExpertScores,
    b: ExpertScores,
    *,
    labels: tuple[str, str] = ("a", "b"),
    score_function: str = "token",
    top_p: Optional[float] = None,
) -> TaskComparison:
    """Compare two tasks scored on the same model (``top_p`` defaults to the paper's p for ``score_function``)."""
    if a.num_experts != b.num_experts:
        raise IncompatibleScoresError(
            f"The two scores cover different MoE layers or expert counts ({a.num_experts} vs {b.num_experts}); "
            "compare tasks scored on the same model."
        )
    top_p = PAPER_TOP_P[score_function] if top_p is None else top_p
    if labels[0] == labels[1]:
        raise ValueError(f"The two tasks need different labels, got {labels}.")
    selections = {labels[0]: a.select(score_function, top_p), labels[1]: b.select(score_function, top_p)}
    overlap = rules.overlap(*selections.values())
    return TaskComparison(
        labels=labels,
        score_function=score_function,
        top_p=top_p,
        selections=selections,
        overlap=overlap,
        concentration={labels[0]: concentration(a, score_function, top_p),
                       labels[1]: concentration(b, score_function, top_p)},
        mean_jaccard=sum(entry["jaccard"] for entry in overlap.values()) / len(overlap),
    )
