"""Scoring's routing capture: for each experts layout kind, a hook that reads the routing decision an MoE layer's
experts receive, ``record(top_k_index[T, K], top_k_weights[T, K])`` on every forward."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..moe.discovery import MoELayer
from ..moe.errors import RoutingReadError
from ..moe.layouts.base import bind_arguments, call_arguments, unwrap
from ..moe.layouts.pesc import active_router

RecordRouting = Callable[[torch.Tensor, torch.Tensor], None]
Capture = Callable[[nn.Module, MoELayer, RecordRouting], RemovableHandle]


def router_of(model: nn.Module, layer: MoELayer) -> nn.Module:
    """The router (``gate``/``router``) of an MoE layer."""
    names = [n for n in layer.router_names if n.rpartition(".")[2] in ("gate", "router")] or layer.router_names
    if not names:
        raise RoutingReadError(f"Layer {layer.key}: no router (`gate`/`router`) found next to {layer.experts_name}.")
    return model.get_submodule(names[0])


def _experts_input(model: nn.Module, layer: MoELayer, record: RecordRouting) -> RemovableHandle:
    """A pre-hook reading ``experts(hidden, top_k_index, top_k_weights)`` calls (after all router post-processing):
    transformers' fused experts and dbrx."""
    experts = model.get_submodule(layer.experts_name)
    names = call_arguments(experts)
    if len(names) < 3:
        raise RoutingReadError(f"Layer {layer.key}: experts forward takes {names}; expected (hidden, index, weights).")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        _, index, weights = bind_arguments(names, args, kwargs, 3, f"Layer {layer.key}: experts")
        record(index, weights)

    return experts.register_forward_pre_hook(hook, with_kwargs=True)


def _router_top_k(model: nn.Module, layer: MoELayer, record: RecordRouting) -> RemovableHandle:
    """ModuleList experts: the gate returns an integer top-K index and float weights of the same shape."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if torch.is_tensor(t)]
        for index in tensors:
            if index.dtype in (torch.int64, torch.int32) and index.dim() >= 1:
                for weights in tensors:
                    if weights.is_floating_point() and weights.shape == index.shape:
                        record(index, weights)
                        return
        raise RoutingReadError(
            f"Layer {layer.key}: the gate returned {[tuple(t.shape) for t in tensors]} "
            "without an integer top-K index and float weights of the same shape; cannot read its routing."
        )

    return router_of(model, layer).register_forward_hook(hook)


def _router_scores(model: nn.Module, layer: MoELayer, record: RecordRouting) -> RemovableHandle:
    """llama4: the router returns ``(scores[T, E], logits)``; the top-K is its own top-K of its logits."""
    router = router_of(model, layer)
    top_k = int(unwrap(router).top_k)

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        scores, logits = output[0], output[1]
        index = torch.topk(logits, top_k, dim=1).indices
        record(index, scores.gather(1, index))

    return router.register_forward_hook(hook)


def _router_sorted(model: nn.Module, layer: MoELayer, record: RecordRouting) -> RemovableHandle:
    """jetmoe: the router returns the expert-sorted decision ``(sorted_slots, batch_index, batch_gates,
    expert_size, logits)``, put back in token order."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        sorted_slots, _, batch_gates, expert_size, logits = output
        tokens = logits.shape[0]
        sizes = torch.as_tensor(expert_size, device=sorted_slots.device)
        experts = torch.repeat_interleave(torch.arange(len(sizes), device=sorted_slots.device), sizes)
        index = torch.empty_like(sorted_slots).index_copy_(0, sorted_slots, experts)
        weights = torch.empty_like(batch_gates).index_copy_(0, sorted_slots, batch_gates)
        record(index.view(tokens, -1), weights.view(tokens, -1))

    return router_of(model, layer).register_forward_hook(hook)


def _pesc_router(model: nn.Module, layer: MoELayer, record: RecordRouting) -> RemovableHandle:
    """PESC-crafted layers: the active adapter's router returns ``(logits, top_k_weights, top_k_index)``."""
    router = active_router(model.get_submodule(layer.experts_name), f"Layer {layer.key}")

    def hook(module: nn.Module, args: tuple, output: tuple) -> None:
        _, weights, index = output
        record(index, weights)

    return router.register_forward_hook(hook)


CAPTURES: dict[str, Capture] = {
    "fused": _experts_input,
    "split_glu": _experts_input,
    "dense_bmm": _router_scores,
    "parallel_linear": _router_sorted,
    "module_list": _router_top_k,
    "pesc": _pesc_router,
}


def capture_routing(model: nn.Module, layer: MoELayer, record: RecordRouting) -> RemovableHandle:
    """Hook ``layer`` so that every forward calls ``record(top_k_index[T, K], top_k_weights[T, K])``."""
    try:
        capture = CAPTURES[layer.kind]
    except KeyError:
        raise RoutingReadError(f"Layer {layer.key}: no routing capture for {layer.kind!r} experts.") from None
    return capture(model, layer, record)
