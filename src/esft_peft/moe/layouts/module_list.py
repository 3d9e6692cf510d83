"""Experts as an ``nn.ModuleList``/``nn.ModuleDict`` of MLP modules (DeepSeek's remote code used by the ESFT
authors, switch-transformers and nllb-moe ``expert_{i}`` dicts).

Each selected expert's modules with parameters are wrapped whole (module deltas, computed as
``F.linear(x, W + delta)``); the router is read from its output, an integer top-K index and float weights of the same
shape (remote-code DeepSeek: ``(topk_idx, topk_weight, aux_loss)``; others ``(weights, idx)``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import RoutingReadError, UnsupportedLayoutError
from ..partitioned import logical_shape
from .base import (
    PROJECTIONS,
    Deltas,
    ExpertsLayout,
    RecordRouting,
    is_experts_name,
    named_base_modules,
    router_of,
    unwrap,
)


class ModuleListExperts(ExpertsLayout):
    kind = "module_list"

    def detect(self, name: str, module: nn.Module) -> bool:
        if not is_experts_name(name) or not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or len(module) < 2:
            return False
        children = list(module.children())
        same_type = len({type(unwrap(child)) for child in children}) == 1
        return same_type and any(isinstance(unwrap(m), nn.Linear) for m in children[0].modules())

    def num_experts(self, experts: nn.Module) -> int:
        return len(experts)

    def delta_targets(self, experts_name: str) -> list[str]:
        return []

    def expert_modules(self, experts_name: str, experts: nn.Module) -> dict[int, str]:
        modules = {}
        for child, _ in experts.named_children():
            digits = re.search(r"(\d+)$", child)
            if digits is None:
                raise UnsupportedLayoutError(f"Cannot read an expert id from the experts entry named {child!r}.")
            modules[int(digits.group(1))] = f"{experts_name}.{child}"
        return modules

    def expert_shapes(self, model: nn.Module, experts_name: str) -> dict[str, list[int]]:
        experts = model.get_submodule(experts_name)
        modules = self.expert_modules(experts_name, experts)
        first = model.get_submodule(modules[min(modules)])
        return {
            f"{name}.{param_name}" if name else param_name: list(logical_shape(param))
            for name, module in named_base_modules(first)
            for param_name, param in module.named_parameters(recurse=False)
        }

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> Any:
        raise UnsupportedLayoutError("ModuleList experts are trained through module deltas, not an experts layer.")

    def watch_routing(self, model: nn.Module, layer: Any, record: RecordRouting) -> RemovableHandle:
        key = layer.key

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if torch.is_tensor(t)]
            for index in tensors:
                if index.dtype in (torch.int64, torch.int32) and index.dim() >= 1:
                    for weights in tensors:
                        if weights.is_floating_point() and weights.shape == index.shape:
                            record(index, weights)
                            return
            raise RoutingReadError(
                f"Layer {key}: the gate returned {[tuple(t.shape) for t in tensors]} "
                "without an integer top-K index and float weights of the same shape; cannot read its routing."
            )

        return router_of(model, layer).register_forward_hook(hook)

    def official_projections(
        self, layer: Any, experts: nn.Module, rows: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if not set(PROJECTIONS) <= set(rows):
            raise UnsupportedLayoutError(
                f"Layer {layer.key}: ModuleList experts without gate_proj/up_proj/down_proj ({sorted(rows)})."
            )
        return {projection: rows[projection] for projection in PROJECTIONS}
