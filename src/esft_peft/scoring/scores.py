"""``ExpertScores``: per-layer expert relevance scores, their selection, files and compatibility checks."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..defaults import SCORE_FUNCTIONS, paper_top_p
from ..files import atomic_write_text
from ..moe.discovery import MoELayer, find_moe_layers
from ..moe.layer_keys import LayerMap, layer_sort_key, normalize_layer_key
from ..tuners.esft.config import ESFTConfig
from . import selection as rules

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FORMAT_NAME = "esft-peft-expert-scores"
FORMAT_VERSION = 1
AVERAGES = ("tokens", "sequences")
LAYER_FIELDS = ("token_scores", "gate_scores", "token_counts", "expert_counts", "weight_sums")


class IncompatibleScoresError(ValueError):
    """Scores were computed on a model whose MoE layers or expert counts differ from the one at hand."""


class ExpertSelection(dict):
    """``{layer: [expert ids]}`` chosen from scores; ``num_experts`` records the scored model's expert counts, so
    ``ESFTConfig(experts=selection)`` refuses a model with other counts at injection."""

    def __init__(self, experts: dict[str, list[int]], num_experts: dict[str, int]) -> None:
        super().__init__(experts)
        self.num_experts = {layer: num_experts[layer] for layer in experts}


TOKEN_SCORE_TOLERANCE = 1e-3


@dataclass
class ExpertScores:
    """Relevance of every routed expert of every MoE layer to one task.

    Attributes:
        token_scores: layer -> per-expert token selection ratio (sums to 1 per layer).
        gate_scores: layer -> per-expert mean routing weight per token.
        token_counts: layer -> counted (non-padding, unmasked) tokens.
        expert_counts: layer -> how many counted tokens chose each expert (sums to tokens * top_k).
        top_k: experts per token.
        average: "tokens" (pooled over all tokens, official code) or "sequences" (mean of per-sequence means, paper).
        num_sequences: sequences with at least one counted token.
        weight_sums: layer -> {"mean", "min", "max"} of the per-token sum of routing weights.
        renormalized: True when every token's weights add up to one constant (top-K renormalised, possibly scaled).
        weight_scale: that constant (1.0 renormalised; e.g. 2.5 with DeepSeek-V3's routed_scaling_factor).
        metadata: model, data fingerprint, budget, seed, library versions.
    Layer keys are ``ESFTConfig.experts`` keys (decoder-layer indices as strings); lookups also take ints
    (``scores.token_scores[1]``).
    """

    token_scores: dict[str, list[float]]
    gate_scores: dict[str, list[float]]
    token_counts: dict[str, int] = field(default_factory=dict)
    expert_counts: dict[str, list[int]] = field(default_factory=dict)
    top_k: Optional[int] = None
    average: str = "tokens"
    num_sequences: Optional[int] = None
    weight_sums: dict[str, dict[str, float]] = field(default_factory=dict)
    renormalized: Optional[bool] = None
    weight_scale: Optional[float] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in LAYER_FIELDS:
            values = getattr(self, name)
            setattr(self, name, LayerMap({normalize_layer_key(layer): value for layer, value in values.items()}))
        if not self.token_scores:
            raise ValueError("ExpertScores needs scores of at least one MoE layer.")
        if set(self.token_scores) != set(self.gate_scores):
            raise ValueError("token_scores and gate_scores must cover the same layers.")
        for layer, values in self.token_scores.items():
            if len(values) != len(self.gate_scores[layer]):
                raise ValueError(
                    f"Layer {layer}: {len(values)} token scores but {len(self.gate_scores[layer])} gate scores."
                )
        if self.average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {self.average!r}.")

    @property
    def layers(self) -> list[str]:
        """Layer keys in numeric order."""
        return sorted(self.token_scores, key=layer_sort_key)

    @property
    def num_experts(self) -> dict[str, int]:
        return {layer: len(self.token_scores[layer]) for layer in self.layers}

    def scores(self, score_function: str = "token") -> dict[str, list[float]]:
        """The token or gate scores."""
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"Unknown score function {score_function!r}; choose one of {SCORE_FUNCTIONS}.")
        return self.token_scores if score_function == "token" else self.gate_scores

    # ------------------------------------------------------------------------------------------------ selection

    def select(
        self,
        score_function: str = "token",
        top_p: Optional[float] = None,
        *,
        top_k: Optional[int] = None,
        budget: Optional[int] = None,
        randomize: bool = False,
        seed: int = 0,
        model: Optional[nn.Module] = None,
    ) -> ExpertSelection:
        """Experts to train per layer, in descending relevance, for ``ESFTConfig(experts=...)``.

        Exactly one rule applies: ``top_p`` (default 0.2: the paper's rule, per layer, the expert crossing p
        included), ``top_k`` experts per layer, or ``budget`` experts in total (at least one per layer).
        ``randomize=True`` draws the same number of experts per layer at random (seeded): the paper's baseline.
        With ``model``, the scores are first checked against its MoE layers.
        """
        scores = self.scores(score_function)
        if model is not None:
            self.check_compatible(model)
        given = [name for name, value in (("top_p", top_p), ("top_k", top_k), ("budget", budget)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"Give one selection rule, not {' and '.join(given)}.")
        if top_k is not None:
            chosen = rules.select_top_k(scores, top_k)
        elif budget is not None:
            chosen = rules.select_budget(scores, budget)
        else:
            top_p = paper_top_p(score_function) if top_p is None else top_p
            if score_function == "gate" and self.weight_scale not in (None, 1.0):
                logger.warning(
                    "Gate scores of this model sum to %.3g per token (scaled routing weights); a top_p for gate "
                    "scores is a share of that total, not of 1.", self.weight_scale,
                )
            chosen = rules.select_top_p(scores, top_p)
        if randomize:
            chosen = rules.select_random(scores, {layer: len(ids) for layer, ids in chosen.items()}, seed)
        return ExpertSelection(chosen, self.num_experts)

    def to_config(self, score_function: str = "token", top_p: Optional[float] = None, *,
                  model: Optional[nn.Module] = None, **config_kwargs: Any) -> ESFTConfig:
        """An ``ESFTConfig`` training the experts chosen by :meth:`select` (checked against ``model`` if given)."""
        return ESFTConfig(experts=self.select(score_function, top_p, model=model), **config_kwargs)

    def check_compatible(self, model: Union[nn.Module, dict[str, MoELayer]]) -> None:
        """Raise :class:`IncompatibleScoresError` unless ``model`` has exactly these MoE layers and expert counts."""
        layers = model if isinstance(model, dict) else find_moe_layers(model)
        source = self.metadata.get("model_name") or self.metadata.get("source") or "another model"
        missing = sorted(set(self.token_scores) - set(layers), key=layer_sort_key)
        unscored = sorted(set(layers) - set(self.token_scores), key=layer_sort_key)
        counts = [
            f"layer {key}: scores for {len(self.token_scores[key])} experts, model has {layers[key].num_experts}"
            for key in self.layers
            if key in layers and layers[key].num_experts != len(self.token_scores[key])
        ]
        problems = (
            ([f"layers {missing} are scored but are not MoE layers of the model"] if missing else [])
            + ([f"MoE layers {unscored} of the model have no scores"] if unscored else [])
            + counts
        )
        if problems:
            raise IncompatibleScoresError(
                f"These expert scores (from {source}) do not match this model: " + "; ".join(problems)
                + ". Score the model you are going to fine-tune."
            )

    # ------------------------------------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        for name in LAYER_FIELDS:
            body[name] = {layer: body[name][layer] for layer in self.layers if layer in body[name]}
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **body}

    def to_official(self) -> dict[str, dict[str, dict[str, float]]]:
        """The official ESFT score summary: ``{"token_scores": {"1": {"0": s, ...}}, "gate_scores": {...}}``."""
        return {
            f"{name}_scores": {
                layer: {str(expert): value for expert, value in enumerate(self.scores(name)[layer])}
                for layer in self.layers
            }
            for name in SCORE_FUNCTIONS
        }

    def save(self, path: PathLike, format: str = "esft") -> None:
        """Write the scores as JSON (atomically): ``format="esft"`` (everything) or ``"official"`` (summary only)."""
        if format not in ("esft", "official"):
            raise ValueError(f"format must be 'esft' or 'official', got {format!r}.")
        data = self.to_dict() if format == "esft" else self.to_official()
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertScores":
        """Build from :meth:`to_dict` output or from an official ESFT score summary."""
        if not isinstance(data, dict):
            raise ValueError(f"Expert scores must be a JSON object, got {type(data).__name__}.")
        if data.get("format") == FORMAT_NAME:
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"Unsupported {FORMAT_NAME} version {data.get('version')!r} (this library reads {FORMAT_VERSION})."
                )
            fields = {k: v for k, v in data.items() if k not in ("format", "version")}
            return cls(**fields)
        if "token_scores" in data and "gate_scores" in data:
            return cls(
                token_scores=_official_layers(data["token_scores"], "token_scores"),
                gate_scores=_official_layers(data["gate_scores"], "gate_scores"),
                metadata={"source": "official ESFT score summary"},
            )
        raise ValueError(
            f"Not an expert scores file: expected format {FORMAT_NAME!r} or an official summary with "
            "'token_scores' and 'gate_scores'."
        )

    @classmethod
    def load(cls, path: PathLike) -> "ExpertScores":
        """Read a file written by :meth:`save` (either format) or an official ESFT ``expert_scores*.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        scores = cls.from_dict(data)
        scores.metadata.setdefault("path", str(path))
        off = {layer: sum(values) for layer, values in scores.token_scores.items()
               if abs(sum(values) - 1.0) > TOKEN_SCORE_TOLERANCE}
        if off:
            layer, total = next(iter(off.items()))
            logger.warning(
                "%s: the token scores of %d layer(s) do not sum to 1 (layer %s: %.4g). They were normalised across "
                "layers (the ESFT authors' current generate_expert_config.py does this), so a per-layer top_p selects "
                "too few experts; re-score with esft-peft or use the authors' earlier per-layer normalisation.",
                path, len(off), layer, total,
            )
        return scores


def _official_layers(layers: Any, name: str) -> dict[str, list[float]]:
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"Official summary: {name!r} must map layer -> {{expert: score}}.")
    result = {}
    for layer, experts in layers.items():
        if not isinstance(experts, dict) or sorted(map(int, experts)) != list(range(len(experts))):
            raise ValueError(f"Official summary: {name}[{layer!r}] must map every expert id 0..E-1 to a score.")
        result[str(layer)] = [float(experts[str(e)]) for e in range(len(experts))]
    return result
