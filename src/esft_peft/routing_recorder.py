"""Record the exact routing decision of every MoE layer during a forward pass, with hooks.

For every layout the recorder reads ``(top_k_index[T, K], top_k_weights[T, K])`` as the experts receive them:

- FUSED / SPLIT_GLU: a forward pre-hook on the experts module, which is called as
  ``experts(hidden[T, H], top_k_index, top_k_weights)`` after all router post-processing;
- DENSE_BMM (llama4): a forward hook on the router, which returns ``(scores[T, E], logits)``; the experts get every
  token scaled by ``scores``, which is zero outside the router's top-K of the logits;
- PARALLEL_LINEAR (jetmoe): a forward hook on the router, whose expert-sorted output
  ``(sorted_slots, batch_index, batch_gates, expert_size, logits)`` is scattered back to ``[T, K]``;
- MODULE_LIST: a forward hook on the gate, whose output holds an integer index tensor and a float weight tensor of
  the same ``[T, K]`` shape (remote-code DeepSeek: ``(topk_idx, topk_weight, aux_loss)``; others ``(weights, idx)``).

Counts are accumulated on the model's device without host synchronisation; only tokens flagged in the current
batch mask are counted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .moe_structure import DENSE_BMM, FUSED, MODULE_LIST, PARALLEL_LINEAR, SPLIT_GLU, MoELayer, unwrap

Routing = tuple[torch.Tensor, torch.Tensor]  # (top_k_index[T, K] long, top_k_weights[T, K])


class RoutingReadError(RuntimeError):
    """A hooked module did not expose a routing decision the recorder can read."""


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


def _router_module(model: nn.Module, layer: MoELayer) -> nn.Module:
    names = [n for n in layer.router_names if n.rpartition(".")[2] in ("gate", "router")] or layer.router_names
    if not names:
        raise RoutingReadError(f"Layer {layer.key}: no router (`gate`/`router`) found next to {layer.experts_name}.")
    return model.get_submodule(names[0])


def _call_arguments(module: nn.Module) -> list[str]:
    return [
        name
        for name, p in inspect.signature(unwrap(module).forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _experts_input_reader(module: nn.Module, key: str) -> Callable[[tuple, dict], Routing]:
    names = _call_arguments(module)
    if len(names) < 3:
        raise RoutingReadError(f"Layer {key}: experts forward takes {names}; expected (hidden, index, weights).")

    def read(args: tuple, kwargs: dict) -> Routing:
        values = dict(zip(names, args))
        values.update(kwargs)
        try:
            return values[names[1]], values[names[2]]
        except KeyError as missing:
            raise RoutingReadError(f"Layer {key}: experts called without {missing}.") from None

    return read


def _dense_router_reader(router: nn.Module) -> Callable[[Any], Routing]:
    top_k = int(unwrap(router).top_k)

    def read(output: Any) -> Routing:
        scores, logits = output[0], output[1]
        index = torch.topk(logits, top_k, dim=1).indices  # the router's own top-K of its logits
        return index, scores.gather(1, index)

    return read


def _parallel_router_reader(output: Any) -> Routing:
    sorted_slots, _, batch_gates, expert_size, logits = output
    tokens = logits.shape[0]
    sizes = torch.as_tensor(expert_size, device=sorted_slots.device)
    experts = torch.repeat_interleave(torch.arange(len(sizes), device=sorted_slots.device), sizes)
    index = torch.empty_like(sorted_slots).index_copy_(0, sorted_slots, experts)
    weights = torch.empty_like(batch_gates).index_copy_(0, sorted_slots, batch_gates)
    return index.view(tokens, -1), weights.view(tokens, -1)


def _gate_output_reader(key: str) -> Callable[[Any], Routing]:
    def read(output: Any) -> Routing:
        tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if torch.is_tensor(t)]
        for index in tensors:
            if index.dtype in (torch.int64, torch.int32) and index.dim() >= 1:
                for weights in tensors:
                    if weights.is_floating_point() and weights.shape == index.shape:
                        return index, weights
        raise RoutingReadError(
            f"Layer {key}: the gate returned {[tuple(t.shape) for t in tensors]} "
            "without an integer top-K index and float weights of the same shape; cannot read its routing."
        )

    return read


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
        if layer.kind in (FUSED, SPLIT_GLU):
            experts = self.model.get_submodule(layer.experts_name)
            read_input = _experts_input_reader(experts, key)
            hook = lambda module, args, kwargs: self._record(key, *read_input(args, kwargs))  # noqa: E731
            self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
            return
        router = _router_module(self.model, layer)
        if layer.kind == DENSE_BMM:
            read_output = _dense_router_reader(router)
        elif layer.kind == PARALLEL_LINEAR:
            read_output = _parallel_router_reader
        elif layer.kind == MODULE_LIST:
            read_output = _gate_output_reader(key)
        else:
            raise RoutingReadError(f"Layer {key}: no routing reader for experts of kind {layer.kind!r}.")
        self._handles.append(
            router.register_forward_hook(lambda module, args, output: self._record(key, *read_output(output)))
        )

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
