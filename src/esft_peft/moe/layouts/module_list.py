"""Experts as an ``nn.ModuleList``/``nn.ModuleDict`` of MLP modules (DeepSeek's remote code used by the ESFT
authors, switch-transformers and nllb-moe ``expert_{i}`` dicts).

Each selected expert's modules with parameters are wrapped whole (ESFT's module deltas); the router returns an integer
top-K index and float weights of the same shape (remote-code DeepSeek: ``(topk_idx, topk_weight, aux_loss)``;
others ``(weights, idx)``).
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import UnsupportedLayoutError
from ..partitioned import logical_shape
from .base import ExpertsLayout, is_experts_name, named_base_modules, unwrap


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
