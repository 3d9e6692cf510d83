"""Figures of expert scores: a per-layer heatmap and a two-task comparison. Needs the ``plot`` extra (matplotlib)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .expert_scores import ExpertScores
    from .task_comparison import TaskComparison

PathLike = Union[str, os.PathLike]


def require_matplotlib() -> type:
    """matplotlib's ``Figure`` class, or an ImportError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Plotting expert scores needs matplotlib, which is not installed. "
            "Install the plot extra: pip install 'esft-peft[plot]'."
        ) from error
    return Figure


def plot_scores(
    scores: "ExpertScores",
    *,
    score_function: str = "token",
    selection: Optional[dict[str, list[int]]] = None,
    path: Optional[PathLike] = None,
    title: Optional[str] = None,
) -> "Figure":
    """Heatmap of one score function, layers (rows) x experts (columns); selected experts outlined in red."""
    Figure = require_matplotlib()
    import numpy as np

    values = scores.scores(score_function)
    layers = scores.layers
    width = max(len(values[layer]) for layer in layers)
    matrix = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        matrix[row, : len(values[layer])] = values[layer]
    figure = Figure(figsize=(min(4 + 0.14 * width, 18), min(2 + 0.3 * len(layers), 14)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=axes, label=f"{score_function} score")
    chosen = 0
    if selection:
        points = [(expert, row) for row, layer in enumerate(layers) for expert in selection.get(layer, [])]
        chosen = len(points)
        if points:
            xs, ys = zip(*points)
            axes.scatter(xs, ys, marker="s", s=60, facecolors="none", edgecolors="red", linewidths=1.2,
                         label="selected")
            axes.legend(loc="upper right", fontsize="small")
    axes.set_yticks(range(len(layers)), labels=layers)
    axes.set_xlabel("routed expert")
    axes.set_ylabel("MoE layer")
    default = f"{score_function} scores ({scores.average} average)"
    if selection:
        default += f", {chosen} experts selected"
    axes.set_title(title or default)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_comparison(comparison: "TaskComparison", path: Optional[PathLike] = None) -> "Figure":
    """Two panels over layers: selection overlap (Jaccard) and routing concentration of each task."""
    Figure = require_matplotlib()
    first, second = comparison.labels
    layers = list(comparison.overlap)
    positions = range(len(layers))
    figure = Figure(figsize=(min(5 + 0.3 * len(layers), 18), 6), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.bar(positions, [comparison.overlap[layer]["jaccard"] for layer in layers], color="tab:purple")
    top.set_ylabel("selection overlap\n(Jaccard)")
    top.set_ylim(0, 1)
    top.set_title(
        f"{first} vs {second}: {comparison.score_function} scores, p={comparison.top_p}, "
        f"mean overlap {comparison.mean_jaccard:.2f}"
    )
    for label in comparison.labels:
        bottom.plot(positions, [comparison.concentration[label][layer]["experts"] for layer in layers], marker="o",
                    label=label)
    bottom.set_ylabel(f"experts to reach p={comparison.top_p}")
    bottom.set_xticks(list(positions), labels=layers)
    bottom.set_xlabel("MoE layer")
    bottom.legend(fontsize="small")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
