"""Record the exact routing decision of every MoE layer during a forward pass, with hooks.

Each layer's experts layout (:mod:`esft_peft.moe.layouts`) attaches the hook that reads ``(top_k_index[T, K],
top_k_weights[T, K])`` as its experts receive them. Counts are accumulated on the model's device without host
synchronisation; only tokens flagged in the current batch mask are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..moe.discovery import MoELayer
from ..moe.errors import RoutingReadError
from .routing_capture import capture_routing


@dataclass
class LayerTotals:
    """Running sums of one MoE layer over counted tokens (float64, on the model's device)."""

    counts: torch.Tensor  # [E] number of counted tokens routed to each expert
    gates: torch.Tensor  # [E] summed routing weight per expert
    tokens: torch.Tensor  # [] counted tokens seen by this layer
    weight_sum: torch.Tensor  # [] summed per-token weight totals
    weight_min: torch.Tensor  # [] smallest per-token weight total
    weight_max: torch.Tensor  # [] largest per-token weight total
    seq_counts: Optional[torch.Tensor] = None  # [E] sum over sequences of per-sequence selection ratios
    seq_gates: Optional[torch.Tensor] = None  # [E] sum over sequences of per-sequence mean gates
    top_k: int = 0
    calls: int = 0
    dtype: Optional[torch.dtype] = None  # dtype of the routing weights as the experts receive them

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device, per_sequence: bool) -> "LayerTotals":
        zero = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(
            counts=zero(num_experts),
            gates=zero(num_experts),
            tokens=zero(()),
            weight_sum=zero(()),
            weight_min=torch.full((), float("inf"), dtype=torch.float64, device=device),
            weight_max=torch.full((), float("-inf"), dtype=torch.float64, device=device),
            seq_counts=zero(num_experts) if per_sequence else None,
            seq_gates=zero(num_experts) if per_sequence else None,
        )


@dataclass
class BatchMask:
    """Which flattened tokens of the current batch count, and the sequence each token belongs to."""

    counted: torch.Tensor  # [T] float64 0/1
    sequence: torch.Tensor  # [T] long
    num_sequences: int
    sequence_tokens: torch.Tensor = field(init=False)  # [B] counted tokens per sequence

    def __post_init__(self) -> None:
        self.sequence_tokens = torch.zeros(self.num_sequences, dtype=torch.float64, device=self.counted.device)
        self.sequence_tokens.index_add_(0, self.sequence, self.counted)


class RoutingRecorder:
    """Hooks on every MoE layer that accumulate per-expert counts and gate sums over masked tokens.

    Use as a context manager: the hooks are removed on exit, exceptions included.
    """

    def __init__(self, model: nn.Module, layers: dict[str, MoELayer], per_sequence: bool) -> None:
        self.model = model
        self.layers = layers
        self.per_sequence = per_sequence
        device = next(model.parameters()).device
        self.totals = {key: LayerTotals.zeros(layer.num_experts, device, per_sequence) for key, layer in layers.items()}
        self.mask: Optional[BatchMask] = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "RoutingRecorder":
        try:
            for key, layer in self.layers.items():
                self._attach(key, layer)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this recorder registered."""
        while self._handles:
            self._handles.pop().remove()

    def _attach(self, key: str, layer: MoELayer) -> None:
        record = lambda index, weights: self._record(key, index, weights)  # noqa: E731
        self._handles.append(capture_routing(self.model, layer, record))

    def _record(self, key: str, index: torch.Tensor, weights: torch.Tensor) -> None:
        if self.mask is None:
            raise RoutingReadError("RoutingRecorder: a routed forward ran outside a scoring batch.")
        totals = self.totals[key]
        num_experts = totals.counts.shape[0]
        top_k = index.shape[-1]
        index = index.reshape(-1, top_k)
        totals.dtype = totals.dtype or weights.dtype
        weights = weights.reshape(-1, top_k).to(torch.float64)
        counted = self.mask.counted
        if index.shape[0] != counted.shape[0]:
            raise RoutingReadError(
                f"Layer {key}: the router saw {index.shape[0]} tokens but the batch has {counted.shape[0]}; "
                "scoring needs every token of the batch routed once per forward."
            )
        valid = (index >= 0) & (index < num_experts)  # some routers mark dropped slots with an out-of-range id
        flat = index.clamp(0, num_experts - 1).reshape(-1)
        hit = (valid.to(torch.float64) * counted[:, None]).reshape(-1)
        gate = weights.reshape(-1) * hit
        totals.counts.index_add_(0, flat, hit)
        totals.gates.index_add_(0, flat, gate)
        per_token = (weights * valid).sum(-1)
        is_counted = counted > 0
        totals.tokens += counted.sum()
        totals.weight_sum += (per_token * counted).sum()
        totals.weight_min = torch.minimum(totals.weight_min, torch.where(is_counted, per_token, float("inf")).min())
        totals.weight_max = torch.maximum(totals.weight_max, torch.where(is_counted, per_token, float("-inf")).max())
        if self.per_sequence:  # each sequence contributes the mean over its own counted tokens
            share = 1.0 / self.mask.sequence_tokens.clamp(min=1.0)
            scale = share[self.mask.sequence].repeat_interleave(top_k)
            totals.seq_counts.index_add_(0, flat, hit * scale)
            totals.seq_gates.index_add_(0, flat, gate * scale)
        totals.top_k = top_k
        totals.calls += 1
