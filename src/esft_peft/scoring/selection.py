"""Expert selection rules over per-layer relevance scores (ESFT paper, section 2 of docs/ESFT method notes).

Every rule works per MoE layer on the scores as stored, i.e. normalised within the layer by its token count
(token selection ratios sum to 1 per layer; gate scores are the mean routing weight per token). This is the
normalisation of the earlier official code, which reproduces the published expert configs; the current official
code divides by the sum across layers instead, a known defect that selects far fewer experts.

Every rule returns ``{layer: [expert ids in descending relevance]}``, ready for ``ESFTConfig(experts=...)``.
"""

from __future__ import annotations

import operator
import random
from typing import Mapping

from ..defaults import PAPER_TOP_P
from ..moe.layer_keys import layer_sort_key

Scores = Mapping[str, list[float]]


def check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        paper = ", ".join(f"{p} for {name} scores" for name, p in PAPER_TOP_P.items())
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r} (paper: {paper}).")


def ranked(scores: list[float]) -> list[int]:
    """Expert ids by descending score; ties keep ascending expert id (a stable sort, as the official code)."""
    return sorted(range(len(scores)), key=lambda expert: -scores[expert])


def select_top_p(scores: Scores, top_p: float) -> dict[str, list[int]]:
    """Per layer, the most relevant experts until their scores add up to ``top_p``; the expert crossing it is kept.

    At least one expert per layer is always selected.
    """
    check_top_p(top_p)
    selection = {}
    for layer in sorted(scores, key=layer_sort_key):
        chosen, total = [], 0.0
        for expert in ranked(scores[layer]):
            if total >= top_p:
                break
            chosen.append(expert)
            total += scores[layer][expert]
        selection[layer] = chosen
    return selection


def _integer(value: object) -> object:
    """``value`` as an int when it is an integer of any kind (numpy's included); otherwise unchanged."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return value
    return operator.index(value)


def select_top_k(scores: Scores, k: int) -> dict[str, list[int]]:
    """The ``k`` most relevant experts of every layer."""
    fewest = min(len(values) for values in scores.values())
    k = _integer(k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= fewest:
        raise ValueError(f"top_k must be an integer in [1, {fewest}] (experts per layer), got {k!r}.")
    return {layer: ranked(scores[layer])[:k] for layer in sorted(scores, key=layer_sort_key)}


def select_budget(scores: Scores, budget: int) -> dict[str, list[int]]:
    """``budget`` experts in all: the best expert of every layer, then the highest remaining scores of any layer.

    Scores are compared across layers as stored (each layer's scores are normalised within the layer).
    """
    layers = sorted(scores, key=layer_sort_key)
    available = sum(len(scores[layer]) for layer in layers)
    budget = _integer(budget)
    if isinstance(budget, bool) or not isinstance(budget, int) or not len(layers) <= budget <= available:
        raise ValueError(
            f"budget must be an integer in [{len(layers)}, {available}] (at least one expert per layer), "
            f"got {budget!r}."
        )
    orders = {layer: ranked(scores[layer]) for layer in layers}
    selection = {layer: orders[layer][:1] for layer in layers}
    rest = [(layer, expert) for layer in layers for expert in orders[layer][1:]]
    rest.sort(key=lambda item: -scores[item[0]][item[1]])
    for layer, expert in rest[: budget - len(layers)]:
        selection[layer].append(expert)
    return selection


def select_random(scores: Scores, counts: Mapping[str, int], seed: int = 0) -> dict[str, list[int]]:
    """Random experts with ``counts[layer]`` per layer (the paper's random-expert baseline), seeded.

    Lists are ordered by descending score, like every other selection.
    """
    rng = random.Random(seed)
    selection = {}
    for layer in sorted(counts, key=layer_sort_key):
        drawn = set(rng.sample(range(len(scores[layer])), counts[layer]))
        selection[layer] = [expert for expert in ranked(scores[layer]) if expert in drawn]
    return selection


def overlap(a: Mapping[str, list[int]], b: Mapping[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per shared layer: sizes of both selections, experts in both, and their Jaccard index."""
    result = {}
    for layer in sorted(set(a) & set(b), key=layer_sort_key):
        first, second = set(a[layer]), set(b[layer])
        union = first | second
        result[layer] = {
            "a": len(first),
            "b": len(second),
            "shared": len(first & second),
            "jaccard": len(first & second) / len(union) if union else 1.0,
        }
    return result
